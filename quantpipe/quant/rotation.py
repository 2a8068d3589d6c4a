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

import numpy as np

__all__ = ["KINDS", "orthogonal_matrix", "hadamard_matrix", "hadamard_order_supported", "splitmix64"]

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
