"""The tensor codec: encode = clip + quantize + pack, decode = unpack + dequantize.

This is the API that calibration, evaluation and the stage daemons call. It dispatches to the fused
single-pass kernels of :mod:`quantpipe.quant._kernels` (compiled with numba) when they are available,
and to the numpy reference (:mod:`quantpipe.quant.primitives` + :mod:`quantpipe.quant.packing`)
otherwise. Both produce identical bytes and identical floats (tested).

The environment variable ``QUANTPIPE_CODEC`` picks the implementation: unset or ``auto`` (the fast
kernels when numba imports, else the reference), ``reference`` (always numpy), ``fast`` (the kernels,
or an error saying what to install). A daemon calls :func:`warmup` at start so that the first frame
does not pay for loading (or, on a fresh install, compiling) the kernels.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from quantpipe.errors import ConfigError, MissingDependencyError, QuantpipeError
from quantpipe.quant import packing, primitives
from quantpipe.quant.primitives import WIRE_BITS, QuantizationInputError, as_range, check_bits, range_for_shape

__all__ = [
    "NonFiniteInputError",
    "QuantizationInputError",
    "encoded_nbytes",
    "encode",
    "decode",
    "backend",
    "warmup",
    "PreparedRange",
    "prepare_range",
]

_ENV = "QUANTPIPE_CODEC"


class NonFiniteInputError(QuantpipeError, ValueError):
    """The tensor to encode holds NaN values, which no integer code can represent."""

    def __init__(self, count: int):
        super().__init__(
            f"tensor to encode holds {count} NaN value(s); refusing to quantize it silently "
            "(fix the stage that produced it, or pass allow_nan=True to encode NaN as code 0)"
        )
        self.count = count


@functools.cache
def _load_kernels() -> ModuleType | None:
    """The compiled kernels module, or None where numba is missing or the host is big-endian."""
    if sys.byteorder != "little":  # the kernels read codes as little-endian words
        return None
    try:
        from quantpipe.quant import _kernels
    except ImportError:
        return None
    return _kernels


def _kernels_or_none() -> ModuleType | None:
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice == "reference":
        return None
    if choice == "auto":
        return _load_kernels()
    if choice == "fast":
        kernels = _load_kernels()
        if kernels is None:
            raise MissingDependencyError(
                f"{_ENV}=fast needs numba on a little-endian host: pip install numba, or set {_ENV}=reference"
            )
        return kernels
    raise ConfigError(f"{_ENV}={choice!r} is not one of auto, fast, reference")


def backend() -> str:
    """``"fast"`` (compiled kernels) or ``"reference"`` (numpy): what encode/decode use now."""
    return "fast" if _kernels_or_none() is not None else "reference"


def warmup() -> str:
    """Load (or compile, the first time after install) every fast kernel; return :func:`backend`.

    Compiled machine code is cached on disk next to the module, so only the first call after an
    install or upgrade compiles (tens of seconds on a small CPU); later processes load it in well
    under a second.
    """
    kernels = _kernels_or_none()
    if kernels is not None:
        kernels.warmup()
    return backend()


def encoded_nbytes(n: int, bits: int) -> int:
    """Payload bytes of ``n`` values at ``bits`` bits (32: raw float32)."""
    bits = check_bits(bits, WIRE_BITS)
    return 4 * int(n) if bits == 32 else packing.packed_nbytes(n, bits)


@dataclass(frozen=True)
class _RowTables:
    """A validated clip range prepared for the kernels: float32 arrays tiled to one kernel row, read-only."""

    lo: np.ndarray
    inverse: np.ndarray
    step: np.ndarray


@functools.lru_cache(maxsize=64)
def _row_tables(bits: int, lo_shape: tuple, lo_bytes: bytes, hi_shape: tuple, hi_bytes: bytes) -> _RowTables:
    """Validate and tile a clip range once; a daemon reuses a handful of (range, bitwidth) pairs.

    Validating, computing the steps and tiling costs tens of microseconds, as much as encoding a whole
    [197, 192] tensor, so it is cached by value. Invalid ranges raise and are never cached.
    """
    kernels = _load_kernels()
    lo_a, hi_a = as_range(np.frombuffer(lo_bytes, np.float32).reshape(lo_shape),
                          np.frombuffer(hi_bytes, np.float32).reshape(hi_shape))
    step, inverse = primitives.step_and_inverse(lo_a, hi_a, bits)
    period = kernels.row_period(lo_a.shape[0] if lo_a.ndim else 1)

    def tiled(a: np.ndarray) -> np.ndarray:
        t = np.full(period, a, dtype=np.float32) if a.ndim == 0 else np.tile(a, period // a.shape[0])
        t.flags.writeable = False
        return t

    return _RowTables(lo=tiled(lo_a), inverse=tiled(inverse), step=tiled(step))


def _tables_for(shape: tuple[int, ...], lo, hi, bits: int) -> _RowTables:
    """The cached kernel tables of ``(lo, hi)`` at ``bits`` for a tensor of ``shape`` (validated)."""
    lo_a = np.asarray(lo, dtype=np.float32)
    hi_a = np.asarray(hi, dtype=np.float32)
    if lo_a.ndim == 1 and (not shape or lo_a.shape[0] != shape[-1]):
        range_for_shape(shape, lo_a, hi_a)  # raises the precise error
    return _row_tables(bits, lo_a.shape, lo_a.tobytes(), hi_a.shape, hi_a.tobytes())


def _check_out(out: np.ndarray, dtype: np.dtype, size: int, what: str) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.size != size:
        raise QuantizationInputError(
            f"out= must be a {np.dtype(dtype).name} numpy array of {size} elements for {what}, "
            f"got {type(out).__name__} {getattr(out, 'dtype', '')} of {getattr(out, 'size', '?')} elements"
        )
    if not (out.flags.c_contiguous and out.flags.aligned and out.flags.writeable):
        raise QuantizationInputError("out= must be a writable, aligned, C-contiguous array: allocate it with np.empty")


def encode(
    x: np.ndarray, bits: int, lo=None, hi=None, *, allow_nan: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Encode a float32 tensor into a uint8 payload.

    Args:
        x: float32 tensor of any shape (other dtypes are converted); per-channel ranges apply along its
            last axis.
        bits: 1..8 or 16 (quantized) or 32 (raw float32, no range needed).
        lo, hi: clip range, scalars (per tensor) or 1-D arrays of length ``x.shape[-1]``.
        allow_nan: if False (default), a tensor holding NaN raises :class:`NonFiniteInputError`;
            if True, NaNs encode to code 0 (32 bits: travel as NaN).
        out: optional C-contiguous uint8 array of :func:`encoded_nbytes` bytes to write into (a reused
            send buffer); it is returned.

    Returns:
        A 1-D uint8 array of :func:`encoded_nbytes` bytes. At 32 bits and without ``out``, a zero-copy
        view of ``x``.

    Raises:
        QuantizationInputError: unsupported bitwidth, missing/invalid range, wrong channel count, bad
            ``out``.
        NonFiniteInputError: ``x`` holds NaN and ``allow_nan`` is False.
    """
    bits = check_bits(bits, WIRE_BITS)
    # Aligned as well as contiguous: the compiled kernels are specialized for aligned arrays.
    x = np.require(x, dtype=np.float32, requirements=["C", "A"])
    nbytes = encoded_nbytes(x.size, bits)
    if out is not None:
        _check_out(out, np.dtype(np.uint8), nbytes, f"{x.size} values at {bits} bits")
    if bits == 32:
        # min() propagates NaN and allocates nothing: a cheap test before an exact count.
        if not allow_nan and x.size and np.isnan(x.min()):
            raise NonFiniteInputError(int(np.count_nonzero(np.isnan(x))))
        raw = x.reshape(-1).view(np.uint8)
        if out is None:
            return raw
        np.copyto(out.reshape(-1), raw)
        return out
    if lo is None or hi is None:
        raise QuantizationInputError(f"encoding at {bits} bits needs a clip range (lo, hi)")
    dest = out.reshape(-1) if out is not None else np.empty(nbytes, dtype=np.uint8)
    kernels = _kernels_or_none()
    if kernels is None or x.size == 0:
        lo_a, hi_a = range_for_shape(x.shape, lo, hi)
        codes = primitives.quantize(x, lo_a, hi_a, bits)
        nan_count = int(np.count_nonzero(np.isnan(x))) if not allow_nan else 0
        if not nan_count:
            dest[:] = packing.pack(codes, bits)
    else:
        tables = _tables_for(x.shape, lo, hi, bits)
        nan_count = kernels.encode_into(x.reshape(-1), tables.lo, tables.inverse, bits, dest)
    if nan_count and not allow_nan:
        raise NonFiniteInputError(nan_count)
    return dest if out is None else out


def decode(
    payload, shape: tuple[int, ...], bits: int, lo=None, hi=None, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Decode a payload made by :func:`encode` back to a float32 tensor of ``shape``.

    Args:
        payload: bytes-like or uint8 array of exactly :func:`encoded_nbytes` bytes.
        shape: the tensor's shape.
        bits: the bitwidth it was encoded at.
        lo, hi: the clip range it was encoded with (not needed at 32 bits).
        out: optional float32 C-contiguous array of ``prod(shape)`` elements to decode into (saves an
            allocation, and the page faults of touching fresh memory, per frame).

    Returns:
        The float32 tensor of ``shape``: a view of ``out`` when given; at 32 bits without ``out``, a
        zero-copy view of ``payload``.

    Raises:
        QuantizationInputError: wrong payload length, unsupported bitwidth, missing/invalid range,
            wrong channel count, bad ``out``.
    """
    bits = check_bits(bits, WIRE_BITS)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise QuantizationInputError(f"invalid shape {shape}: dimensions must be >= 0")
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload.reshape(-1).view(np.uint8)
    expected = encoded_nbytes(n, bits)
    if buf.size != expected:
        raise QuantizationInputError(
            f"payload has {buf.size} bytes, shape {shape} at {bits} bits needs {expected}: "
            "the sender and receiver disagree on shape or bitwidth"
        )
    if out is not None:
        _check_out(out, np.dtype(np.float32), n, f"shape {shape}")
        result = out.reshape(shape)
    if bits == 32:
        raw = buf.view(np.float32).reshape(shape)
        if out is None:
            return raw
        np.copyto(result, raw)
        return result
    if lo is None or hi is None:
        raise QuantizationInputError(f"decoding at {bits} bits needs a clip range (lo, hi)")
    kernels = _kernels_or_none()
    if kernels is None or n == 0:
        lo_a, hi_a = range_for_shape(shape, lo, hi)
        x = primitives.dequantize(packing.unpack(buf, n, bits).reshape(shape), lo_a, hi_a, bits)
        if out is None:
            return x
        np.copyto(result, x)
        return result
    tables = _tables_for(shape, lo, hi, bits)
    if out is None:
        result = np.empty(shape, dtype=np.float32)
    kernels.decode_into(buf, tables.step, tables.lo, bits, result.reshape(-1))
    return result


class PreparedRange:
    """A clip range at one bitwidth, validated and laid out for the kernels once: the hot-path form of
    :func:`encode` / :func:`decode` for a daemon that reuses the same few ranges on every frame.

    Produces exactly the bytes and floats of :func:`encode` / :func:`decode` with the same range (it is
    the same code, minus the per-call validation, hashing and tiling of the range).
    """

    def __init__(self, lo, hi, bits: int) -> None:
        self.bits = check_bits(bits, WIRE_BITS)
        if self.bits == 32:
            raise QuantizationInputError("32 bits is raw float32 and has no clip range to prepare")
        self.lo, self.hi = as_range(np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32))
        self.channels = int(self.lo.shape[0]) if self.lo.ndim else 0
        kernels = _load_kernels()
        self._tables = _tables_for((self.channels or 1,), self.lo, self.hi, self.bits) if kernels is not None else None

    def _kernels(self) -> ModuleType | None:
        kernels = _kernels_or_none()
        return kernels if kernels is not None and self._tables is not None else None

    def _check_channels(self, shape: tuple[int, ...]) -> None:
        if self.channels and (not shape or shape[-1] != self.channels):
            range_for_shape(shape, self.lo, self.hi)  # raises the precise error

    def encode(self, x: np.ndarray, out: np.ndarray, *, allow_nan: bool = False) -> np.ndarray:
        """Encode float32 ``x`` (C-contiguous, aligned) into ``out`` (uint8, :func:`encoded_nbytes` bytes)."""
        self._check_channels(x.shape)
        dest = out.reshape(-1)
        kernels = self._kernels()
        if kernels is None or x.size == 0:
            return encode(x, self.bits, self.lo, self.hi, allow_nan=allow_nan, out=out)
        nan_count = kernels.encode_into(x.reshape(-1), self._tables.lo, self._tables.inverse, self.bits, dest)
        if nan_count and not allow_nan:
            raise NonFiniteInputError(nan_count)
        return out

    def decode(self, payload: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Decode a uint8 payload into float32 ``out`` (its shape is the tensor's)."""
        self._check_channels(out.shape)
        kernels = self._kernels()
        if kernels is None or out.size == 0:
            return decode(payload, out.shape, self.bits, self.lo, self.hi, out=out)
        kernels.decode_into(payload, self._tables.step, self._tables.lo, self.bits, out.reshape(-1))
        return out


def prepare_range(lo, hi, bits: int) -> PreparedRange:
    """:class:`PreparedRange` of ``(lo, hi)`` at ``bits``; raises :class:`QuantizationInputError` if invalid."""
    return PreparedRange(lo, hi, bits)
