"""Deterministic orthogonal rotations of the boundary tensor.

A few channels of a ViT residual stream carry values far larger than the rest (DeiT has several), and
at 2-3 bits no clip range serves both those values and the bulk. Quantizing ``x @ R`` for an
orthogonal ``R`` and sending back ``x_hat @ R.T`` spreads each outlier over every channel while keeping
the error in the original space equal to the error in the rotated one (``R`` preserves norms): the
incoherence idea of QuIP# / QuaRot (Ashkboos et al. 2024) and SpinQuant (Liu et al. 2024).

Two kinds:

* ``"hadamard"``: a randomized Hadamard matrix ``diag(s) H / sqrt(C)`` with random signs ``s``. Hadamard
  orders built here: ``2**k`` (Sylvester), ``12 * 2**k`` and ``20 * 2**k`` (Paley construction I from the
  primes 11 and 19, times Sylvester), which covers DeiT-Tiny ``192 = 12*16``, ViT-S ``384 = 12*32`` and
  ViT-B ``768 = 12*64``. Every entry has magnitude ``1/sqrt(C)``, so an outlier channel is spread
  evenly over all channels. For other ``C`` this kind falls back to ``"random"``
  (:func:`hadamard_order_supported` tells which).
* ``"random"``: the Q factor of a QR decomposition of a Gaussian matrix, signs fixed by ``diag(R) > 0``
  (a Haar-distributed orthogonal matrix).

Determinism: the random signs and Gaussians come from a counter-based SplitMix64 generator written
here, not from numpy's ``Generator`` (whose streams numpy does not promise to keep across versions),
so the same ``(C, seed, kind)`` gives the same matrix on every machine and numpy version (up to the
last bits of LAPACK's QR for ``"random"``). A clip table stores the matrix anyway.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np

__all__ = ["KINDS", "Rotation", "orthogonal_matrix", "hadamard_matrix", "hadamard_order_supported", "splitmix64"]

KINDS: tuple[str, ...] = ("hadamard", "random")
#: Orders of the Paley-I base matrices: prime q = 3 (mod 4) gives a Hadamard matrix of order q + 1.
_PALEY_PRIMES = {12: 11, 20: 19}


def splitmix64(seed: int, n: int, stream: int = 0) -> np.ndarray:
    """``n`` pseudo-random uint64 from SplitMix64 (Steele, Lea, Flood 2014) at counters ``0..n-1``.

    Counter-based (each output depends only on ``seed``, ``stream`` and its index), vectorised with
    numpy's wrapping uint64 arithmetic.
    """
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap modulo 2**64
        base = (np.uint64(int(seed)) * np.uint64(0xD1B54A32D192ED03)) ^ (np.uint64(int(stream) + 1) * golden)
        z = base + (np.arange(1, n + 1, dtype=np.uint64) * golden)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, n: int, stream: int) -> np.ndarray:
    """Uniform floats in (0, 1) from the top 53 bits (never 0, so log() is safe)."""
    return ((splitmix64(seed, n, stream) >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _gaussian(seed: int, n: int) -> np.ndarray:
    """Standard normals by the Box-Muller transform of two independent uniform streams."""
    u1, u2 = _uniform(seed, n, 1), _uniform(seed, n, 2)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _signs(seed: int, n: int) -> np.ndarray:
    return np.where((splitmix64(seed, n, 0) >> np.uint64(63)) == 1, -1.0, 1.0)


def _paley(q: int) -> np.ndarray:
    """Hadamard matrix of order ``q + 1`` by Paley construction I (``q`` prime, ``q = 3 mod 4``).

    With the quadratic character ``chi`` mod q, the Jacobsthal matrix ``Q[i, j] = chi(j - i)`` is
    antisymmetric, and ``I + [[0, 1^T], [-1, Q]]`` is Hadamard.
    """
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if d in residues else -1 for d in range(1, q)], dtype=np.float64)
    jac = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return np.eye(q + 1) + s


def _factor(c: int) -> tuple[int, int] | None:
    """``(base, 2**k)`` with ``c = base * 2**k`` and base in {1, 12, 20}, or None."""
    for base in (1, 12, 20):
        if c % base == 0:
            rest = c // base
            if rest >= 1 and rest & (rest - 1) == 0:
                return base, rest
    return None


def hadamard_order_supported(c: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order ``c`` (``2**k``, ``12 * 2**k`` or ``20 * 2**k``)."""
    return int(c) >= 1 and _factor(int(c)) is not None


def hadamard_matrix(c: int) -> np.ndarray:
    """An unnormalised ``c x c`` Hadamard matrix (entries +-1, ``H H^T = c I``), float64.

    Raises:
        ValueError: ``c`` is not ``2**k``, ``12 * 2**k`` or ``20 * 2**k``.
    """
    f = _factor(int(c)) if int(c) >= 1 else None
    if f is None:
        raise ValueError(f"no Hadamard construction here for order {c}: need 2**k, 12*2**k or 20*2**k")
    base, power = f
    h = np.ones((1, 1)) if base == 1 else _paley(_PALEY_PRIMES[base])
    sylvester = np.array([[1.0, 1.0], [1.0, -1.0]])
    while h.shape[0] < c:
        h = np.kron(sylvester, h)
    return h


def orthogonal_matrix(c: int, seed: int = 0, kind: str = "hadamard") -> np.ndarray:
    """A deterministic orthogonal ``[c, c]`` float32 matrix; rotate a boundary as ``x @ R``.

    Args:
        c: the channel count (the last axis of the boundary tensor).
        seed: selects the random signs (``"hadamard"``) or the Gaussian matrix (``"random"``).
        kind: ``"hadamard"`` (randomized Hadamard, falling back to ``"random"`` for orders it cannot
            build) or ``"random"`` (Haar-random via QR).

    Returns:
        ``R`` with ``R @ R.T == I`` to float32 rounding (computed in float64, then rounded).

    Raises:
        ValueError: ``c < 1``, a bad seed, or an unknown kind.
    """
    if isinstance(c, bool) or int(c) != c or int(c) < 1:
        raise ValueError(f"rotation size must be a positive integer, got {c!r}")
    c = int(c)
    if kind not in KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "hadamard" and hadamard_order_supported(c):
        # diag(s) H keeps H's flat magnitudes; the signs decorrelate it from the data's structure
        r = _signs(seed, c)[:, None] * hadamard_matrix(c) / math.sqrt(c)
    else:
        g = _gaussian(seed, c * c).reshape(c, c)
        q, upper = np.linalg.qr(g)
        r = q * np.where(np.diag(upper) < 0, -1.0, 1.0)[None, :]  # unique, Haar-distributed Q
    return np.ascontiguousarray(r, dtype=np.float32)


#: Shortest contiguous run a butterfly stage works on (shorter ones are folded into the base product).
_MIN_SPAN = 16


class Rotation:
    """An orthogonal ``R`` prepared for the hot path: ``apply(x) = x @ R`` and ``invert(y) = y @ R.T``.

    A clip table stores ``R`` as a matrix. When ``R`` is exactly (to the float32 rounding the table
    stores) a randomized Hadamard matrix ``diag(s) H / sqrt(C)`` built here, with ``H = S ⊗ B`` a
    Sylvester matrix ``S`` of order ``2**k`` and a base ``B`` of order 1, 12 or 20 (:func:`hadamard_matrix`),
    the product is computed as a fast transform instead of a dense ``[C, C]`` matmul::

        x @ R = WHT_k((x * s / sqrt(C)) viewed as [2**k, q]) @ B            (q = 1, 12 or 20)

    i.e. one multiply by the scaled signs, a Walsh-Hadamard butterfly over the ``2**k`` groups
    (``k`` add/subtract stages, O(C log C)) and a ``q x q`` product per group: about ``q + log2(C)``
    operations per value instead of ``C`` (on DeiT-Tiny's C = 192: 16 instead of 192). Any other
    orthogonal matrix (the ``"random"`` kind) is applied as one float32 BLAS product. Both write into
    buffers the caller reuses, and the results agree with the dense product to float32 rounding (not
    bit for bit: the summation order differs), which is all a receiver needs: the codes are the
    sender's, and decoding only inverts the rotation.
    """

    def __init__(self, matrix: np.ndarray) -> None:
        r = np.ascontiguousarray(matrix, dtype=np.float32)
        if r.ndim != 2 or r.shape[0] != r.shape[1]:
            raise ValueError(f"a rotation is a square matrix, got shape {r.shape}")
        self.matrix = r
        self.channels = c = r.shape[0]
        self._base: np.ndarray | None = None
        self._scaled_signs: np.ndarray | None = None
        self.groups = 1
        self.kind = "dense"
        f = _factor(c) if hadamard_order_supported(c) else None
        if f is not None:
            h = hadamard_matrix(c)
            signs = np.round(np.diag(r.astype(np.float64) @ h.T) / math.sqrt(c))
            if np.all(np.abs(signs) == 1) and np.array_equal(
                    r, np.ascontiguousarray(signs[:, None] * h / math.sqrt(c), dtype=np.float32)):
                base, power = f
                # H = S_(2**k) = S_(2**k / 16) ⊗ S_16: for a pure power of two, fold the first four stages
                # into a 16 x 16 base product so that every butterfly runs over >= 16 contiguous values
                # (measured: 2x faster at C = 256; folding a 12 or 20 base further only adds work).
                while base & (base - 1) == 0 and base < _MIN_SPAN and power > 1:
                    base, power = base * 2, power // 2
                self.kind = "hadamard"
                self.groups = power
                self._q = base
                self._scaled_signs = (signs / math.sqrt(c)).astype(np.float32)
                self._base = hadamard_matrix(base).astype(np.float32) if base > 1 else None
                self._base_t = np.ascontiguousarray(self._base.T) if self._base is not None else None
        self._tmp: np.ndarray | None = None

    @property
    def fast(self) -> bool:
        """Whether the fast (Walsh-Hadamard) transform applies."""
        return self.kind == "hadamard"

    def _scratch(self, n: int) -> np.ndarray:
        if self._tmp is None or self._tmp.size < n:
            self._tmp = np.empty(n, dtype=np.float32)
        return self._tmp[:n]

    def apply(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[...] = x @ R`` over the last axis; ``out`` is a C-contiguous float32 array of x's size, not ``x``."""
        _check_out(out)
        x2 = x.reshape(-1, self.channels)
        o2 = out.reshape(-1, self.channels)
        if not self.fast:
            np.matmul(x2, self.matrix, out=o2)
            return out
        if self._base is None:
            np.multiply(x2, self._scaled_signs, out=o2)
            _wht(o2, self.groups, 1, _kernels())
            return out
        t = self._scratch(x2.size).reshape(x2.shape)
        kernels = _kernels()
        if kernels is None:
            np.multiply(x2, self._scaled_signs, out=t)
        else:
            kernels.mul_rows(kernels.readonly(x2.reshape(-1)), kernels.readonly(self._scaled_signs), t.reshape(-1))
        _wht(t, self.groups, self._q, kernels)
        np.matmul(t.reshape(-1, self._q), self._base, out=o2.reshape(-1, self._q))
        return out

    def invert(self, y: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[...] = y @ R.T`` (the receiver's inverse); ``out`` (C-contiguous) may be ``y`` only for the
        dense kind."""
        _check_out(out)
        y2 = y.reshape(-1, self.channels)
        o2 = out.reshape(-1, self.channels)
        if not self.fast:
            np.matmul(y2, self.matrix.T, out=o2)
            return out
        if self._base is None:
            np.copyto(o2, y2)
        else:
            np.matmul(y2.reshape(-1, self._q), self._base_t, out=o2.reshape(-1, self._q))
        kernels = _kernels()
        _wht(o2, self.groups, self._q, kernels)
        if kernels is None:
            np.multiply(o2, self._scaled_signs, out=o2)
        else:
            kernels.mul_rows_inplace(o2.reshape(-1), kernels.readonly(self._scaled_signs))
        return out


def _kernels() -> ModuleType | None:
    """The numba kernels module, or None (no numba, or ``QUANTPIPE_CODEC=reference``)."""
    from quantpipe.quant.codec import _kernels_or_none  # QUANTPIPE_CODEC picks the kernels here too

    return _kernels_or_none()


def _check_out(out: np.ndarray) -> None:
    """The results are written through ``out.reshape``, which would copy (and lose them) for a strided ``out``."""
    if not (out.flags.c_contiguous and out.dtype == np.float32):
        raise ValueError(f"Rotation writes into a C-contiguous float32 out; got {out.dtype} with strides {out.strides}")


def _wht(a: np.ndarray, groups: int, q: int, kernels: ModuleType | None) -> None:
    """In-place Walsh-Hadamard butterfly over ``groups`` blocks of ``q`` values in each row of ``a``
    (C-contiguous), stage by stage: stage ``h`` pairs group ``g`` with ``g + h``, ``h = 1, 2, 4, ...``.

    With numba, the first four stages of each block of 16 groups run in one pass with the values in
    registers (``_kernels.H16``, for ``q`` = 12, 16, 20 and at least 16 groups), the later, long-span
    stages through :func:`~quantpipe.quant._kernels.wht_rows`; without it the same stages in the same
    order as numpy operations. All three give the same bits. ``kernels``: :func:`_kernels`, looked up by
    the caller (None: the numpy path)."""
    if groups == 1:
        return
    if kernels is None:  # no numba (or QUANTPIPE_CODEC=reference): the same butterfly with numpy views
        v = a.reshape(a.shape[0], groups, q)
        h = 1
        while h < groups:
            w = v.reshape(a.shape[0], groups // (2 * h), 2, h, q)
            top, bottom = w[:, :, 0], w[:, :, 1]
            s = top + bottom
            np.subtract(top, bottom, out=bottom)
            top[...] = s
            h *= 2
        return
    flat = a.reshape(-1)
    first = 1
    h16 = kernels.H16.get(q) if groups % 16 == 0 else None
    if h16 is not None:
        h16(flat)
        first = 16
    if groups > first:
        kernels.wht_rows(flat, a.shape[1], groups, q, first)
