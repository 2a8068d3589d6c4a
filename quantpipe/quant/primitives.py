"""Affine quantization primitives: the one numpy definition of rounding and clipping.

Everything that quantizes a boundary tensor (calibration, evaluation, the stage daemons, the fast
kernels in :mod:`quantpipe.quant._kernels`) follows these definitions exactly; the fast path is tested
bit-for-bit against them.

Uniform affine quantization to ``M`` bits over ``[lo, hi]`` (algorithms.md section 3)::

    L     = 2**M - 1                     # number of steps
    s     = (hi - lo) / L                # step
    q     = floor((clip(x, lo, hi) - lo) * (L / (hi - lo)) + 0.5)   # integer in [0, L]
    x_hat = q * s + lo

All arithmetic is float32, in that order, so that a compiled kernel can reproduce it bit for bit.

Ranges are either scalars (per tensor) or 1-D arrays of length ``C`` that broadcast over the last axis
(per channel: the hidden dimension of a ``[B, tokens, C]`` ViT residual stream).

Edge cases (documented behaviour, tested):

* constant range (``hi == lo``): every value encodes to code 0 and decodes to ``lo``; never a division
  by zero.
* ``+inf`` / ``-inf`` saturate to ``hi`` / ``lo`` like any out-of-range value.
* a degenerate range narrower than ``L / 3.4e38`` (about ``1e-38 * L``, subnormal) has an infinite
  inverse step: every value above ``lo`` encodes to ``L`` (an absolute error below the span). Numpy's
  overflow warnings for it are silenced: the result is defined.
* ``NaN`` encodes to code 0; it never affects a neighbouring value. The codec counts NaNs so that the
  caller can refuse the tensor (:func:`quantpipe.quant.codec.encode` raises by default).
* an inverted range (``hi < lo``), a non-finite range, a range whose width ``hi - lo`` overflows
  float32 (its step would be infinite and code 0 would decode to NaN), a per-channel range whose length is not the
  tensor's last axis (or a per-channel range for a 0-d tensor) and an unsupported bitwidth are rejected
  with :class:`QuantizationInputError` (a ``ValueError`` and a
  :class:`~quantpipe.errors.QuantpipeError`).
* 32 bits means no quantization: the float32 tensor travels as is.
"""

from __future__ import annotations

import numpy as np

from quantpipe.errors import QuantpipeError

__all__ = [
    "QuantizationInputError",
    "QUANT_BITS",
    "WIRE_BITS",
    "check_bits",
    "code_dtype",
    "levels",
    "as_range",
    "range_for_shape",
    "step_and_inverse",
    "quantize",
    "dequantize",
]

class QuantizationInputError(QuantpipeError, ValueError):
    """Invalid arguments to the quantizer: bitwidth, clip range, channel count, payload length."""


#: Bitwidths that are quantized (integer codes).
QUANT_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16)
#: Bitwidths a frame may carry: the quantized ones plus 32 (raw float32).
WIRE_BITS: tuple[int, ...] = QUANT_BITS + (32,)


def check_bits(bits: int, allowed: tuple[int, ...] = QUANT_BITS) -> int:
    """Return ``bits`` as an int if it is one of ``allowed``, else raise :class:`QuantizationInputError`."""
    try:
        valid = not isinstance(bits, bool) and int(bits) == bits and int(bits) in allowed
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise QuantizationInputError(f"unsupported bitwidth {bits!r}: choose one of {', '.join(map(str, allowed))}")
    return int(bits)


def code_dtype(bits: int) -> np.dtype:
    """The unsigned integer dtype that holds one code of ``bits`` bits."""
    return np.dtype(np.uint8) if check_bits(bits) <= 8 else np.dtype(np.uint16)


def levels(bits: int) -> int:
    """``L = 2**bits - 1``, the largest code."""
    return (1 << check_bits(bits)) - 1


def as_range(lo, hi, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a clip range and return it as two float32 arrays (0-d or 1-d).

    Args:
        lo, hi: scalars or 1-D arrays of equal length.
        channels: if given, 1-D ranges must have this length (the last axis of the tensor).
    """
    lo_a = np.asarray(lo, dtype=np.float32)
    hi_a = np.asarray(hi, dtype=np.float32)
    if lo_a.shape != hi_a.shape or lo_a.ndim > 1:
        raise QuantizationInputError(f"clip range must be two scalars or two 1-D arrays of equal length, got shapes {lo_a.shape} and {hi_a.shape}")
    if lo_a.ndim == 1 and channels is not None and lo_a.shape[0] != channels:
        raise QuantizationInputError(f"per-channel clip range has {lo_a.shape[0]} channels but the tensor's last axis has {channels}")
    if not (np.all(np.isfinite(lo_a)) and np.all(np.isfinite(hi_a))):
        raise QuantizationInputError("clip range must be finite: check the clip table or the inline range")
    if np.any(hi_a < lo_a):
        raise QuantizationInputError("clip range is inverted (hi < lo): pass the lower bound first")
    with np.errstate(over="ignore"):
        too_wide = not np.all(np.isfinite(hi_a - lo_a))
    if too_wide:
        raise QuantizationInputError(
            "clip range is wider than float32 can hold (hi - lo overflows): clip to a narrower range"
        )
    return lo_a, hi_a


def range_for_shape(shape: tuple[int, ...], lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """:func:`as_range` for a tensor of ``shape``: per-channel ranges must match its last axis.

    A 0-d tensor has no channel axis, so it only takes a per-tensor range (broadcasting it against
    ``C`` ranges would silently turn one value into ``C``).
    """
    lo_a, hi_a = as_range(lo, hi, shape[-1] if len(shape) else None)
    if lo_a.ndim == 1 and not len(shape):
        raise QuantizationInputError("a 0-d tensor has no channel axis: give it a per-tensor (scalar) clip range")
    return lo_a, hi_a


def step_and_inverse(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Step ``s = (hi - lo) / L`` and its inverse ``L / (hi - lo)`` (0 where the range is empty), float32."""
    n_levels = np.float32(levels(bits))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # see the module docstring
        span = (hi - lo).astype(np.float32)
        step = (span / n_levels).astype(np.float32)
        inverse = np.where(span > 0, n_levels / span, np.float32(0)).astype(np.float32)
    return step, inverse


def quantize(x: np.ndarray, lo, hi, bits: int) -> np.ndarray:
    """Integer codes of ``x`` (reference implementation; see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    lo_a, hi_a = range_for_shape(x.shape, lo, hi)
    _, inverse = step_and_inverse(lo_a, hi_a, bits)
    with np.errstate(over="ignore", invalid="ignore"):  # 0 * inf of a degenerate range: see above
        v = (np.minimum(np.maximum(x, lo_a), hi_a) - lo_a) * inverse
    q = np.floor(v + np.float32(0.5))
    q = np.where(np.isnan(q), np.float32(0), q)  # NaN -> code 0
    q = np.minimum(q, np.float32(levels(bits)))
    return q.astype(code_dtype(bits))


def dequantize(codes: np.ndarray, lo, hi, bits: int) -> np.ndarray:
    """Float32 reconstruction ``q * s + lo`` of integer codes (reference implementation)."""
    codes = np.asarray(codes)
    lo_a, hi_a = range_for_shape(codes.shape, lo, hi)
    step, _ = step_and_inverse(lo_a, hi_a, bits)
    return (codes.astype(np.float32) * step + lo_a).astype(np.float32)
