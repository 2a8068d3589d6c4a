"""The streaming observer: agreement with the raw-array methods, constant memory, exact merge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantpipe.errors import ConfigError
from quantpipe.quant import clipping
from quantpipe.quant.clipping import METHODS, CalibrationDataError, quantization_mse
from quantpipe.quant.observer import BoundaryObserver

C = 24


def _boundary(batches: int, seed: int, tokens: int = 197) -> np.ndarray:
    """A DeiT-like residual stream [B, tokens, C]: per-channel offsets and scales, a peaked body with
    heavy tails, and two outlier channels that are huge on a few tokens."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 2.0, C)
    offset = rng.normal(0, 1.0, C)
    narrow = rng.random((batches, tokens, C)) < 0.8
    body = np.where(narrow, rng.laplace(0, 0.4, narrow.shape), rng.laplace(0, 2.0, narrow.shape))
    x = body * scale + offset
    x[:, 0, 3] += 60.0  # the class token of an outlier channel
    x[:, :5, 17] -= 25.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return _boundary(24, seed=0)


@pytest.fixture(scope="module")
def observed(data) -> BoundaryObserver:
    obs = BoundaryObserver(C, bins=4096)
    for i in range(0, data.shape[0], 3):
        obs.update(data[i : i + 3])
    return obs


@pytest.mark.parametrize("method", METHODS)
def test_ranges_agree_with_the_raw_array_methods(observed, data, method):
    """Streaming ranges are within 1 % of the raw range's width of the raw-array result; the MSE search
    is compared by the MSE it achieves (its optimum is flat, so distinct ranges can tie)."""
    for bits in (2, 4, 8):
        lo, hi = observed.ranges(method, bits)
        ref_lo, ref_hi = clipping.clip_range(data, method, bits)
        assert np.shape(lo) == np.shape(ref_lo) and np.asarray(lo).dtype == np.float32
        assert np.all(lo <= hi)
        if method == "mse_pc":
            got, ref = quantization_mse(data, lo, hi, bits), quantization_mse(data, ref_lo, ref_hi, bits)
            assert got == pytest.approx(ref, rel=0.01)
            continue
        width = np.maximum(np.asarray(ref_hi - ref_lo, dtype=np.float64), 1e-12)
        assert np.max(np.abs(lo - ref_lo) / width) < 0.01, (method, bits)
        assert np.max(np.abs(hi - ref_hi) / width) < 0.01, (method, bits)


def test_exact_statistics_are_exact(observed, data):
    lo, hi = observed.ranges("naive_pc", 4)
    np.testing.assert_array_equal(lo, data.min(axis=(0, 1)))
    np.testing.assert_array_equal(hi, data.max(axis=(0, 1)))
    assert observed.count == data.shape[0] * data.shape[1]


def test_fine_histogram_is_the_histogram_of_the_data(observed, data):
    """Independent check of the adaptive grid: numpy's histogram over the final [-R, R)."""
    state = observed.state_dict()
    for c in (0, 3, 17):
        half = 2.0 ** int(state["exp"][c])
        assert np.abs(data[..., c]).max() < half <= 2 * np.abs(data[..., c]).max()
        ref, _ = np.histogram(data[..., c], bins=observed.bins, range=(-half, half))
        np.testing.assert_array_equal(state["hist"][c], ref)


def test_memory_stays_constant_as_batches_arrive(data):
    obs = BoundaryObserver(C, bins=1024)
    obs.update(data[:1])
    before = obs.nbytes
    shapes = {k: np.shape(v) for k, v in obs.state_dict().items()}
    for i in range(1, data.shape[0]):
        obs.update(data[i : i + 1] * (1.0 + i))  # growing values force the grids to double
    assert obs.nbytes == before
    assert {k: np.shape(v) for k, v in obs.state_dict().items()} == shapes
    assert obs.count == data.shape[0] * data.shape[1]


def test_merge_equals_a_single_pass(data):
    small, big = data[:10] * 0.01, data[10:] * 7.0  # the second worker needs a much wider grid
    single = BoundaryObserver(C, bins=1024)
    for part in (small, big):
        for i in range(0, part.shape[0], 4):
            single.update(part[i : i + 4])
    a, b = BoundaryObserver(C, bins=1024), BoundaryObserver(C, bins=1024)
    a.update(small)
    for i in range(big.shape[0] - 1, -1, -1):  # another order, one image at a time
        b.update(big[i : i + 1])
    merged = a.merge(b)
    s, m = single.state_dict(), merged.state_dict()
    for key in ("count", "exp", "hist", "tensor_exp", "tensor_hist", "min", "max"):
        np.testing.assert_array_equal(m[key], s[key], err_msg=key)
    np.testing.assert_allclose(m["mean"], s["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m["m2"], s["m2"], rtol=1e-10)
    for method in METHODS:
        for x, y in zip(merged.ranges(method, 3), single.ranges(method, 3)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=method)


def test_state_dict_round_trips_through_json(observed):
    text = json.dumps(observed.state_dict(), default=lambda a: a.tolist())
    restored = BoundaryObserver.from_state_dict(json.loads(text))
    for method in METHODS:
        for x, y in zip(restored.ranges(method, 4), observed.ranges(method, 4)):
            np.testing.assert_array_equal(x, y, err_msg=method)


def test_bad_state_dict_is_refused(observed):
    state = observed.state_dict()
    with pytest.raises(ValueError, match="version"):
        BoundaryObserver.from_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="hist"):
        BoundaryObserver.from_state_dict({**state, "hist": state["hist"][:, :10]})
    with pytest.raises(ValueError, match="inconsistent"):
        BoundaryObserver.from_state_dict({**state, "count": state["count"] + 1})
    with pytest.raises(ValueError, match="state dict"):
        BoundaryObserver.from_state_dict({"format": "something else"})


def test_constant_and_zero_channels():
    x = np.random.default_rng(1).normal(size=(2, 50, 4)).astype(np.float32)
    x[..., 1] = 3.0
    x[..., 2] = 0.0
    obs = BoundaryObserver(4, bins=256)
    obs.update(x)
    for method in ("naive_pc", "aciq_pc", "ds_aciq_pc", "mse_pc"):
        lo, hi = obs.ranges(method, 2)
        assert lo[1] == hi[1] == np.float32(3.0) and lo[2] == hi[2] == np.float32(0.0), method


def test_bad_input_is_refused():
    obs = BoundaryObserver(4, bins=256)
    with pytest.raises(CalibrationDataError, match="no data"):
        obs.ranges("naive", 4)
    with pytest.raises(ValueError, match="last axis"):
        obs.update(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="floating"):
        obs.update(np.zeros((2, 4), np.int32))
    bad = np.zeros((2, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(CalibrationDataError, match="NaN"):
        obs.update(bad)
    with pytest.raises(CalibrationDataError, match="float32"):
        obs.update(np.full((2, 4), 1e300))
    assert obs.count == 0  # a refused batch leaves no trace
    obs.update(np.zeros((0, 4), np.float32))
    assert obs.count == 0
    obs.update(np.ones((3, 4), np.float32))
    with pytest.raises(ConfigError, match="mse_pc"):
        obs.ranges("mse", 4)
    with pytest.raises(ValueError, match="bitwidth"):
        obs.ranges("naive", 12)
    with pytest.raises(ValueError, match="power of two"):
        BoundaryObserver(4, bins=1000)
    with pytest.raises(ValueError, match="layouts"):
        obs.merge(BoundaryObserver(5, bins=256))
