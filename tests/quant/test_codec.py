"""The codec: the fast kernels equal the numpy reference byte for byte and float for float; API contract.

The reference is ``packing.pack(primitives.quantize(...))`` / ``primitives.dequantize(packing.unpack(...))``
called directly, so these tests hold whichever backend ``codec`` picks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantpipe.errors import ConfigError, QuantpipeError
from quantpipe.quant import codec, packing, primitives
from quantpipe.quant.codec import NonFiniteInputError, QuantizationInputError
from quantpipe.quant.primitives import QUANT_BITS

# Channel counts that are not multiples of 8 (and one prime larger than a kernel row).
AWKWARD_C = [1, 3, 7, 8, 13, 197, 768, 2053]


@pytest.fixture(scope="module")
def fast():
    """Skip unless the compiled kernels run (numba installed); compile or load them once."""
    pytest.importorskip("numba")
    assert codec.warmup() == "fast"


def _reference_bytes(x, bits, lo, hi) -> np.ndarray:
    return packing.pack(primitives.quantize(x, lo, hi, bits), bits)


def _reference_floats(payload, shape, bits, lo, hi) -> np.ndarray:
    n = int(np.prod(shape))
    return primitives.dequantize(packing.unpack(payload, n, bits).reshape(shape), lo, hi, bits)


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical float32 arrays (NaN payloads included)."""
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _awkward_tensor(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Laplace values sprinkled with NaN, +-inf, exact range ends and huge values."""
    x = rng.laplace(size=shape).astype(np.float32)
    flat = x.reshape(-1)
    if flat.size:
        idx = rng.choice(flat.size, size=min(flat.size, 8), replace=False)
        flat[idx] = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0, 1e-40], np.float32)[: idx.size]
    return x


def _awkward_ranges(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ranges including an empty range, a tiny one (inverse step overflows) and a huge one."""
    lo = -rng.uniform(0.1, 3, channels).astype(np.float32)
    hi = rng.uniform(0.1, 3, channels).astype(np.float32)
    specials = [(0.5, 0.5), (0.0, 1e-37), (-1.5e38, 1.5e38)]
    for c, (a, b) in zip(range(channels), specials):
        lo[c], hi[c] = a, b
    return lo, hi


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("channels", AWKWARD_C)
def test_fast_equals_reference_per_channel(fast, bits, channels):
    rng = np.random.default_rng(1000 * bits + channels)
    rows = int(rng.integers(1, 9)) + (4096 // channels)  # several kernel rows plus a partial one
    x = _awkward_tensor(rng, (rows, channels))
    lo, hi = _awkward_ranges(rng, channels)
    expected = _reference_bytes(x, bits, lo, hi)
    with np.errstate(all="ignore"):
        payload = codec.encode(x, bits, lo, hi, allow_nan=True)
        np.testing.assert_array_equal(payload, expected)
        assert _same_floats(codec.decode(payload, x.shape, bits, lo, hi), _reference_floats(expected, x.shape, bits, lo, hi))


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_fast_equals_reference_per_tensor(fast, bits):
    rng = np.random.default_rng(bits)
    for n in [1, 7, 9, 2047, 2048, 2049, 5003]:
        x = _awkward_tensor(rng, (n,))
        for lo, hi in [(-1.5, 2.0), (0.25, 0.25), (0.0, 1e-37), (-1.5e38, 1.5e38)]:
            expected = _reference_bytes(x, bits, lo, hi)
            with np.errstate(all="ignore"):
                payload = codec.encode(x, bits, lo, hi, allow_nan=True)
                np.testing.assert_array_equal(payload, expected, err_msg=f"n={n} range=({lo}, {hi})")
                assert _same_floats(codec.decode(payload, x.shape, bits, lo, hi), _reference_floats(expected, x.shape, bits, lo, hi))


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(QUANT_BITS),
    per_channel=st.booleans(),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40),
    data=st.data(),
)
def test_fast_equals_reference_random(fast, bits, per_channel, shape, data):
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False)), label="x")
    channel_shape = (shape[-1],) if per_channel else ()
    a = data.draw(hnp.arrays(np.float32, channel_shape, elements=st.floats(-1e6, 1e6, width=32)), label="a")
    b = data.draw(hnp.arrays(np.float32, channel_shape, elements=st.floats(-1e6, 1e6, width=32)), label="b")
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    expected = _reference_bytes(x, bits, lo, hi)
    with np.errstate(all="ignore"):
        payload = codec.encode(x, bits, lo, hi)
        np.testing.assert_array_equal(payload, expected)
        assert _same_floats(codec.decode(payload, shape, bits, lo, hi), _reference_floats(expected, shape, bits, lo, hi))


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_backends_agree_through_the_env_switch(fast, bits, monkeypatch):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(5, 13)).astype(np.float32)
    lo, hi = np.full(13, -1, np.float32), np.linspace(0, 2, 13, dtype=np.float32)
    payload = codec.encode(x, bits, lo, hi)
    decoded = codec.decode(payload, x.shape, bits, lo, hi)
    monkeypatch.setenv("QUANTPIPE_CODEC", "reference")
    assert codec.backend() == "reference"
    np.testing.assert_array_equal(codec.encode(x, bits, lo, hi), payload)
    assert _same_floats(codec.decode(payload, x.shape, bits, lo, hi), decoded)


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("QUANTPIPE_CODEC", "reference")
    assert codec.backend() == "reference" and codec.warmup() == "reference"
    monkeypatch.setenv("QUANTPIPE_CODEC", "bogus")
    with pytest.raises(ConfigError, match="auto, fast, reference"):
        codec.backend()
    monkeypatch.setenv("QUANTPIPE_CODEC", "auto")
    assert codec.backend() in ("fast", "reference")


@pytest.mark.parametrize("backend", ["auto", "reference"])
class TestContract:
    """Behaviour both backends share."""

    @pytest.fixture(autouse=True)
    def _backend(self, backend, monkeypatch):
        monkeypatch.setenv("QUANTPIPE_CODEC", backend)

    @pytest.mark.parametrize("bits", QUANT_BITS)
    def test_nan_is_refused_by_default_and_counted(self, bits):
        x = np.zeros((3, 1000), np.float32)
        x[0, 5] = x[2, 999] = x[1, 0] = np.nan
        with pytest.raises(NonFiniteInputError, match="3 NaN") as info:
            codec.encode(x, bits, -1.0, 1.0)
        assert info.value.count == 3 and isinstance(info.value, QuantpipeError)

    @pytest.mark.parametrize("bits", QUANT_BITS)
    def test_allowed_nan_encodes_to_code_zero_without_touching_neighbours(self, bits):
        rng = np.random.default_rng(bits)
        x = rng.uniform(-2, 2, size=(4, 50)).astype(np.float32)
        mask = rng.random(x.shape) < 0.2
        lo, hi = np.full(50, -1.0, np.float32), np.full(50, 1.5, np.float32)
        with_nan = np.where(mask, np.float32(np.nan), x)
        as_lo = np.where(mask, lo, x)  # lo encodes to code 0 too
        np.testing.assert_array_equal(codec.encode(with_nan, bits, lo, hi, allow_nan=True), codec.encode(as_lo, bits, lo, hi))

    def test_raw_float32_is_a_zero_copy_view(self):
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        payload = codec.encode(x, 32)
        assert payload.dtype == np.uint8 and payload.size == 48 and np.shares_memory(payload, x)
        y = codec.decode(payload, (3, 4), 32)
        assert np.shares_memory(y, x) and np.array_equal(y, x)
        x[1, 1] = np.nan
        with pytest.raises(NonFiniteInputError, match="1 NaN"):
            codec.encode(x, 32)
        assert np.isnan(codec.decode(codec.encode(x, 32, allow_nan=True), (3, 4), 32)[1, 1])

    @pytest.mark.parametrize("bits", [2, 5, 16, 32])
    def test_decode_into_out(self, bits):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(6, 197)).astype(np.float32)
        payload = codec.encode(x, bits, -2.0, 2.0)
        expected = codec.decode(payload, x.shape, bits, -2.0, 2.0)
        out = np.full(x.size, 7.0, np.float32)
        y = codec.decode(bytes(payload), x.shape, bits, -2.0, 2.0, out=out)  # read-only input buffer
        assert y.shape == x.shape and np.shares_memory(y, out) and np.array_equal(y, expected)
        assert np.array_equal(out.reshape(x.shape), expected)

    @pytest.mark.parametrize("bits", [3, 8, 32])
    def test_encode_into_out(self, bits):
        x = np.linspace(-1, 1, 99, dtype=np.float32)
        out = np.empty(codec.encoded_nbytes(x.size, bits), np.uint8)
        assert codec.encode(x, bits, -1.0, 1.0, out=out) is out
        np.testing.assert_array_equal(out, codec.encode(x, bits, -1.0, 1.0))

    def test_bad_out(self):
        payload = codec.encode(np.zeros(10, np.float32), 4, 0.0, 1.0)
        for out, match in [
            (np.empty(9, np.float32), "10 elements"),
            (np.empty(10, np.float64), "float32"),
            (np.empty((10, 2), np.float32)[:, 0], "C-contiguous"),
            ([0.0] * 10, "numpy array"),
        ]:
            with pytest.raises(QuantizationInputError, match=match):
                codec.decode(payload, (10,), 4, 0.0, 1.0, out=out)
        with pytest.raises(QuantizationInputError, match="5 elements"):
            codec.encode(np.zeros(10, np.float32), 4, 0.0, 1.0, out=np.empty(4, np.uint8))

    def test_unaligned_and_non_contiguous_inputs(self):
        x = np.linspace(-3, 3, 301, dtype=np.float32)
        raw = np.empty(x.nbytes + 1, np.uint8)[1:]
        unaligned = raw.view(np.float32)
        unaligned[:] = x
        np.testing.assert_array_equal(codec.encode(unaligned, 6, -2.0, 2.0), codec.encode(x, 6, -2.0, 2.0))
        wide = np.stack([x, x], axis=1)[:, 0]  # strided
        np.testing.assert_array_equal(codec.encode(wide, 6, -2.0, 2.0), codec.encode(x, 6, -2.0, 2.0))
        payload = codec.encode(x, 16, -2.0, 2.0)
        shifted = np.empty(payload.size + 1, np.uint8)[1:]
        shifted[:] = payload
        np.testing.assert_array_equal(codec.decode(shifted, x.shape, 16, -2.0, 2.0), codec.decode(payload, x.shape, 16, -2.0, 2.0))

    @pytest.mark.parametrize("bits", QUANT_BITS + (32,))
    def test_empty_tensors(self, bits):
        for shape in [(0,), (0, 5), (4, 0)]:
            lo = np.zeros(shape[-1], np.float32)
            payload = codec.encode(np.zeros(shape, np.float32), bits, lo, lo + 1)
            assert payload.size == 0
            assert codec.decode(payload, shape, bits, lo, lo + 1).shape == shape

    @pytest.mark.parametrize("bits", QUANT_BITS)
    def test_constant_tensor_and_range(self, bits):
        x = np.full((7, 3), 4.5, np.float32)
        payload = codec.encode(x, bits, 4.5, 4.5)
        assert payload.size == codec.encoded_nbytes(21, bits) and not payload.any()
        np.testing.assert_array_equal(codec.decode(payload, x.shape, bits, 4.5, 4.5), x)

    @pytest.mark.parametrize("bits", [0, 9, 17, 64, True])
    def test_unsupported_bits(self, bits):
        with pytest.raises(QuantizationInputError, match="unsupported bitwidth"):
            codec.encode(np.zeros(4, np.float32), bits, 0.0, 1.0)
        with pytest.raises(QuantizationInputError, match="unsupported bitwidth"):
            codec.decode(bytes(4), (4,), bits, 0.0, 1.0)

    def test_bad_ranges(self):
        x = np.zeros((2, 4), np.float32)
        cases = [
            ((None, None), "needs a clip range"),
            ((np.zeros(3), np.ones(3)), "3 channels but the tensor's last axis has 4"),
            ((1.0, 0.0), "inverted"),
            ((np.zeros(4), np.full(4, np.nan)), "finite"),
        ]
        for (lo, hi), match in cases:
            with pytest.raises(QuantizationInputError, match=match):
                codec.encode(x, 4, lo, hi)
            with pytest.raises(QuantizationInputError, match=match):
                codec.decode(bytes(4), x.shape, 4, lo, hi)
        with pytest.raises(QuantizationInputError, match="0-d tensor"):
            codec.encode(np.float32(1), 4, np.zeros(2), np.ones(2))

    def test_ranges_are_taken_by_value(self):
        """The fast path caches prepared ranges: editing the caller's array in place must still count."""
        x = np.linspace(-2, 2, 64, dtype=np.float32).reshape(8, 8)
        lo, hi = np.full(8, -1, np.float32), np.full(8, 1, np.float32)
        first = codec.encode(x, 4, lo, hi)
        lo[3], hi[5] = -2.0, 0.5
        np.testing.assert_array_equal(codec.encode(x, 4, lo, hi), _reference_bytes(x, 4, lo, hi))
        assert not np.array_equal(codec.encode(x, 4, lo, hi), first)
        y = codec.decode(first, x.shape, 4, lo, hi)
        assert _same_floats(y, _reference_floats(first, x.shape, 4, lo, hi))
        for _ in range(2):  # a rejected range is rejected every time, never remembered
            with pytest.raises(QuantizationInputError, match="inverted"):
                codec.encode(x, 4, hi, lo)

    def test_wrong_payload_length_is_rejected(self):
        codec.decode(bytes(4), (3, 3), 3, 0.0, 1.0)  # 9 codes of 3 bits: exactly 4 bytes
        for size in [3, 5]:
            with pytest.raises(QuantizationInputError, match=f"payload has {size} bytes.*needs 4") as info:
                codec.decode(bytes(size), (3, 3), 3, 0.0, 1.0)
            assert isinstance(info.value, ValueError)
        with pytest.raises(QuantizationInputError, match="needs 36"):
            codec.decode(bytes(35), (3, 3), 32)


def test_encoded_nbytes():
    assert codec.encoded_nbytes(64 * 197 * 768, 4) == 4841472
    assert codec.encoded_nbytes(10, 32) == 40
    assert codec.encoded_nbytes(3, 3) == 2


def test_kernels_refuse_arrays_they_would_overrun(fast):
    """The kernels run without bounds checks: their entry points check sizes and dtypes first."""
    from quantpipe.quant import _kernels

    period = _kernels.row_period(3)
    assert period % 8 == 0 and period % 3 == 0
    table = np.zeros(period, np.float32)
    x = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        _kernels.encode_into(x, table, table, 3, np.empty(3, np.uint8))  # needs 4 bytes
    with pytest.raises(ValueError, match="do not fit"):
        _kernels.encode_into(x.astype(np.float64), table, table, 3, np.empty(4, np.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        _kernels.decode_into(np.zeros(4, np.uint8), table[:-1], table[:-1], 3, x)
    with pytest.raises(ValueError, match="do not fit"):
        _kernels.decode_into(np.zeros(4, np.uint8), table, table, 9, x)


def test_bench_codec_command(capsys):
    """``quantpipe bench`` lists the benchmarks; ``bench codec --json`` reports every requested width."""
    import json

    from quantpipe.cli import main
    from quantpipe.wire import HEADER_SIZE

    assert main(["bench"]) == 0
    assert "codec" in capsys.readouterr().out
    assert main(["bench", "codec", "--shape", "2,5,12", "--bits", "3,8,32", "--repeat", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == codec.backend() and report["values"] == 120
    assert [r["bits"] for r in report["results"]] == [3, 8, 32]
    for r in report["results"]:
        assert r["ideal_bytes"] == -(-120 * r["bits"] // 8)
        assert r["frame_bytes"] == r["ideal_bytes"] + HEADER_SIZE and r["overhead_bytes"] == HEADER_SIZE
        assert r["encode_gbps"] > 0 and r["decode_vs_copy"] > 0
    assert report["target"]["bits"] == [8]
    assert main(["bench", "codec", "--shape", "2,5,12", "--bits", "2", "--repeat", "1", "--per-tensor"]) == 0
    assert "per-tensor ranges" in capsys.readouterr().out
    assert main(["bench", "codec", "--bits", "9"]) == 1
    assert "not supported" in capsys.readouterr().err
    assert main(["bench", "nosuch"]) == 1
    assert "unknown benchmark" in capsys.readouterr().err
