"""Affine quantization primitives (numpy reference): error bounds, clipping, edge cases, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantpipe.errors import QuantpipeError
from quantpipe.quant.primitives import (
    QUANT_BITS,
    QuantizationInputError,
    code_dtype,
    dequantize,
    levels,
    quantize,
    step_and_inverse,
)

EPS = float(np.finfo(np.float32).eps)
# Magnitudes where the range's span cannot overflow float32 (overflow is covered in test_codec).
FINITE = st.floats(-(2.0**100), 2.0**100, width=32)


def _slack(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """float32 rounding allowance of quantize + dequantize on top of step/2.

    About 8 roundings each of relative size eps, of quantities no larger than the span or |lo|, |hi|;
    plus an absolute L * (smallest normal float32) for degenerate spans below that: there the step is
    subnormal, or the inverse step ``L / span`` overflows to inf and every value above ``lo`` saturates
    to ``L`` (documented in primitives), so the error is bounded by the span itself.
    """
    span = hi.astype(np.float64) - lo.astype(np.float64)
    tiny = float(np.finfo(np.float32).tiny)
    return 16 * EPS * (span + np.maximum(np.abs(lo), np.abs(hi))) + levels(bits) * tiny


@st.composite
def ranges(draw, channels: int | None):
    """(lo, hi) float32 scalars (channels None) or [channels] arrays, lo <= hi, some hi == lo."""
    shape = () if channels is None else (channels,)
    a = draw(hnp.arrays(np.float32, shape, elements=FINITE))
    b = draw(hnp.arrays(np.float32, shape, elements=FINITE))
    return np.minimum(a, b), np.maximum(a, b)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(QUANT_BITS), per_channel=st.booleans(), data=st.data())
def test_error_inside_range_is_at_most_half_a_step(bits, per_channel, data):
    channels = data.draw(st.integers(1, 9), label="channels")
    rows = data.draw(st.integers(0, 7), label="rows")
    lo, hi = data.draw(ranges(channels if per_channel else None), label="range")
    u = data.draw(hnp.arrays(np.float64, (rows, channels), elements=st.floats(0, 1)), label="u")
    span = hi.astype(np.float64) - lo.astype(np.float64)
    # points inside [lo, hi], including both ends
    x = np.clip((lo + u * span).astype(np.float32), lo, hi)
    codes = quantize(x, lo, hi, bits)
    assert codes.dtype == code_dtype(bits) and codes.shape == x.shape
    assert codes.max(initial=0) <= levels(bits)
    x_hat = dequantize(codes, lo, hi, bits)
    assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
    step, _ = step_and_inverse(lo, hi, bits)
    err = np.abs(x_hat.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= step.astype(np.float64) / 2 + _slack(lo, hi, bits))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(QUANT_BITS), lohi=ranges(None), beyond=st.floats(0, 2.0**100, width=32))
def test_values_outside_the_range_clip_to_its_ends(bits, lohi, beyond):
    lo, hi = lohi
    x = np.array([lo - beyond, -np.inf, hi + beyond, np.inf, lo, hi], dtype=np.float32)
    codes = quantize(x, lo, hi, bits)
    top = levels(bits) if hi > lo else 0
    assert codes.tolist() == [0, 0, top, top, 0, top]
    x_hat = dequantize(codes, lo, hi, bits)
    slack = _slack(lo, hi, bits)
    assert np.all(np.abs(x_hat[[0, 1, 4]].astype(np.float64) - lo) <= slack)
    assert np.all(np.abs(x_hat[[2, 3, 5]].astype(np.float64) - hi) <= slack)


def test_hand_worked_codes():
    """2 bits over [0, 3]: step 1, inverse 1; q = floor(x + 0.5), clipped."""
    x = np.array([-1.0, 0.0, 0.49, 0.5, 1.5, 2.5, 2.9, 3.0, 7.0], dtype=np.float32)
    assert quantize(x, 0.0, 3.0, 2).tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 3]
    np.testing.assert_array_equal(dequantize(np.array([0, 1, 2, 3], np.uint8), 0.0, 3.0, 2), [0.0, 1.0, 2.0, 3.0])


def test_per_channel_ranges_apply_along_the_last_axis():
    x = np.array([[0.5, 0.5, 0.5], [2.0, 2.0, 2.0]], dtype=np.float32)
    lo = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    hi = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    # 1 bit: channel 0 threshold 0.5 (rounds up), channel 1 1.5, channel 2 below lo -> 0
    assert quantize(x, lo, hi, 1).tolist() == [[1, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_constant_range_encodes_to_zero_and_decodes_to_lo(bits):
    x = np.array([[-5.0, 1.25, 1.25, 9.0, np.inf, -np.inf]], dtype=np.float32)
    with np.errstate(all="raise"):  # no division by zero, no invalid operation
        codes = quantize(x, 1.25, 1.25, bits)
        assert not codes.any()
        np.testing.assert_array_equal(dequantize(codes, 1.25, 1.25, bits), np.full(x.shape, 1.25, np.float32))
    # one constant channel among normal ones
    lo = np.array([0, 2, 0, 0, 0, 0], dtype=np.float32)
    hi = np.array([1, 2, 1, 1, 1, 1], dtype=np.float32)
    codes = quantize(x, lo, hi, bits)
    assert codes[0, 1] == 0 and codes[0, 3] == levels(bits)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_empty_tensors(bits):
    for shape in [(0,), (0, 4), (3, 0)]:
        lo = np.zeros(shape[-1], np.float32)
        codes = quantize(np.zeros(shape, np.float32), lo, lo + 1, bits)
        assert codes.shape == shape
        assert dequantize(codes, lo, lo + 1, bits).shape == shape


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(QUANT_BITS), data=st.data())
def test_nan_encodes_to_zero_and_never_affects_neighbours(bits, data):
    x = data.draw(hnp.arrays(np.float32, (4, 5), elements=st.floats(-10, 10, width=32)), label="x")
    mask = data.draw(hnp.arrays(np.bool_, (4, 5)), label="nan mask")
    lo = np.full(5, -3, np.float32)
    hi = np.array([3, 3, 0, 1, 8], np.float32)
    with_nan = np.where(mask, np.float32(np.nan), x)
    codes = quantize(with_nan, lo, hi, bits)
    assert not codes[mask].any()
    np.testing.assert_array_equal(codes[~mask], quantize(x, lo, hi, bits)[~mask])


def test_scalar_tensor():
    assert quantize(np.float32(0.75), 0.0, 1.0, 2).shape == ()
    assert int(quantize(np.float32(0.75), 0.0, 1.0, 2)) == 2  # 0.75 * 3 + 0.5 = 2.75


@pytest.mark.parametrize(
    ("lo", "hi", "match"),
    [
        (1.0, 0.0, "inverted"),
        (np.array([0.0, 0.0, 2.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0]), "inverted"),
        (0.0, np.inf, "finite"),
        (-3e38, 3e38, "wider than float32"),
        (np.nan, 1.0, "finite"),
        (np.zeros(3), np.ones(4), "equal length"),
        (np.zeros((2, 2)), np.ones((2, 2)), "1-D"),
        (np.zeros(3), np.ones(3), "3 channels but the tensor's last axis has 4"),
    ],
)
def test_bad_ranges(lo, hi, match):
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(QuantizationInputError, match=match) as info:
        quantize(x, lo, hi, 4)
    assert isinstance(info.value, QuantpipeError) and isinstance(info.value, ValueError)
    with pytest.raises(QuantizationInputError, match=match):
        dequantize(np.zeros((2, 4), np.uint8), lo, hi, 4)


def test_zero_dim_tensor_refuses_per_channel_range():
    with pytest.raises(QuantizationInputError, match="0-d tensor"):
        quantize(np.float32(1.0), np.zeros(3), np.ones(3), 4)


@pytest.mark.parametrize("bits", [0, 9, 15, 32, 2.5, True, "8", None])
def test_unsupported_bitwidth(bits):
    with pytest.raises(QuantizationInputError, match="unsupported bitwidth"):
        quantize(np.zeros(3, np.float32), 0.0, 1.0, bits)
    with pytest.raises(QuantizationInputError, match="unsupported bitwidth"):
        levels(bits)


def test_step_and_inverse():
    step, inverse = step_and_inverse(np.array([0, 1, -2], np.float32), np.array([3, 1, 2], np.float32), 2)
    assert step.dtype == inverse.dtype == np.float32
    np.testing.assert_array_equal(step, [1, 0, np.float32(4) / np.float32(3)])
    np.testing.assert_array_equal(inverse, [1, 0, np.float32(3) / np.float32(4)])
