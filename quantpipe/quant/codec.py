"""The tensor codec: encode = clip + quantize + pack, decode = unpack + dequantize.

This is the API that calibration, evaluation and the stage daemons call. It dispatches to a fused
single-pass kernel (:mod:`quantpipe.quant._kernels`, compiled with numba) when available, and to the
numpy reference (:mod:`quantpipe.quant.primitives` + :mod:`quantpipe.quant.packing`) otherwise or when
``QUANTPIPE_CODEC=reference`` is set. Both produce identical bytes.
"""

from __future__ import annotations

import os

import numpy as np

from quantpipe.errors import QuantpipeError
from quantpipe.quant import packing, primitives
from quantpipe.quant.primitives import WIRE_BITS, as_range, check_bits

__all__ = ["NonFiniteInputError", "encoded_nbytes", "encode", "decode", "backend"]


class NonFiniteInputError(QuantpipeError, ValueError):
    """The tensor to encode holds NaN values, which no integer code can represent."""

    def __init__(self, count: int):
        super().__init__(f"tensor to encode holds {count} NaN value(s); refusing to quantize it silently")
        self.count = count


def backend() -> str:
    """``"reference"`` (numpy) or ``"fast"`` (compiled kernel): which implementation encode/decode use."""
    if os.environ.get("QUANTPIPE_CODEC", "").lower() == "reference":
        return "reference"
    return "fast" if _fast() is not None else "reference"


def _fast():
    try:
        from quantpipe.quant import _kernels
    except ImportError:
        return None
    return _kernels


def encoded_nbytes(n: int, bits: int) -> int:
    """Payload bytes of ``n`` values at ``bits`` bits (32: raw float32)."""
    bits = check_bits(bits, WIRE_BITS)
    return 4 * int(n) if bits == 32 else packing.packed_nbytes(n, bits)


def encode(x: np.ndarray, bits: int, lo=None, hi=None, *, allow_nan: bool = False) -> np.ndarray:
    """Encode a float32 tensor into a uint8 payload.

    Args:
        x: float32 tensor of any shape; per-channel ranges apply along its last axis.
        bits: 1..8 or 16 (quantized) or 32 (raw float32, no range needed).
        lo, hi: clip range, scalars (per tensor) or 1-D arrays of length ``x.shape[-1]``.
        allow_nan: if False (default), a tensor holding NaN raises :class:`NonFiniteInputError`;
            if True, NaNs encode to code 0.

    Returns:
        A 1-D uint8 array of :func:`encoded_nbytes` bytes.
    """
    bits = check_bits(bits, WIRE_BITS)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if bits == 32:
        if not allow_nan and np.isnan(x).any():
            raise NonFiniteInputError(int(np.isnan(x).sum()))
        return x.reshape(-1).view(np.uint8)
    if lo is None or hi is None:
        raise ValueError(f"encoding at {bits} bits needs a clip range (lo, hi)")
    lo_a, hi_a = as_range(lo, hi, x.shape[-1] if x.ndim else None)
    codes = primitives.quantize(x, lo_a, hi_a, bits)
    if not allow_nan:
        nan_count = int(np.isnan(x).sum())
        if nan_count:
            raise NonFiniteInputError(nan_count)
    return packing.pack(codes, bits)


def decode(payload, shape: tuple[int, ...], bits: int, lo=None, hi=None) -> np.ndarray:
    """Decode a payload made by :func:`encode` back to a float32 tensor of ``shape``."""
    bits = check_bits(bits, WIRE_BITS)
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.frombuffer(payload, dtype=np.uint8) if not isinstance(payload, np.ndarray) else payload.reshape(-1).view(np.uint8)
    expected = encoded_nbytes(n, bits)
    if buf.size != expected:
        raise ValueError(f"payload has {buf.size} bytes, shape {shape} at {bits} bits needs {expected}")
    if bits == 32:
        return buf.view(np.float32).reshape(shape)
    if lo is None or hi is None:
        raise ValueError(f"decoding at {bits} bits needs a clip range (lo, hi)")
    lo_a, hi_a = as_range(lo, hi, shape[-1] if shape else None)
    codes = packing.unpack(buf, n, bits).reshape(shape)
    return primitives.dequantize(codes, lo_a, hi_a, bits)
