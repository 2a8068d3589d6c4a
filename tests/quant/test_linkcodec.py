"""The per-link codec (quantpipe.quant.linkcodec) against the numpy reference, and its resolve-once promises."""

from __future__ import annotations

import numpy as np
import pytest

from quantpipe import wire
from quantpipe.benchmarks.pipeline import build_table
from quantpipe.errors import FrameError
from quantpipe.quant import packing, primitives, rotation
from quantpipe.quant import table as table_module
from quantpipe.quant.linkcodec import BoundaryCodec, BufferPool
from quantpipe.quant.table import ClipTable

BITS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
METHODS = ["aciq", "aciq_pc", "rot_aciq_pc", "rot_mse_pc"]


def _samples(n=48, t=10, c=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.laplace(0, 0.5, size=(n, t, c)).astype(np.float32)
    x[:, :, 7] *= 25.0  # an outlier channel, as in a ViT residual stream
    return x


@pytest.fixture(scope="module")
def table() -> ClipTable:
    return build_table(_samples(), METHODS, BITS, boundaries=2)


def _reference_codes(x, table, boundary, method, bits):
    """What the reference quantizes: x (or x @ R in float64, rounded to float32) with the table's range."""
    lo, hi = table.ranges(boundary, method, bits)
    r = table.transform(boundary, method)
    xr = x if r is None else (x.astype(np.float64) @ r.astype(np.float64)).astype(np.float32)
    return primitives.quantize(xr, lo, hi, bits), xr, lo, hi


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", METHODS)
def test_codes_match_the_reference(table, name, bits):
    m = table.method_index(name)
    enc = BoundaryCodec(table, 1, m, stage=1)
    x = _samples(4, 197, 192, seed=3)
    frames = enc.encode(x, bits, seq=5, first_id=20)
    ref, xr, lo, hi = _reference_codes(x, table, 1, m, bits)
    codes = packing.unpack(np.asarray(frames[1]), x.size, bits).reshape(x.shape)
    if table.transform(1, m) is None:
        assert bytes(frames[1]) == packing.pack(ref, bits).tobytes()  # byte-exact
    else:
        # The fast rotation sums in another order than the dense product: a value within float32
        # rounding of a code boundary may take the neighbouring code. Each such code must be off by one
        # and explained by that rounding; at <= 8 bits they must also be rare.
        differ = codes != ref
        assert np.all(np.abs(codes.astype(int) - ref.astype(int))[differ] == 1)
        x64 = x.astype(np.float64) @ table.transform(1, m).astype(np.float64)
        lo64 = np.broadcast_to(np.asarray(lo, np.float64), x.shape)[differ]
        step = (np.broadcast_to(np.asarray(hi, np.float64), x.shape)[differ] - lo64) / (2 ** bits - 1)
        boundary = lo64 + (np.minimum(codes, ref)[differ] + 0.5) * step
        assert np.all(np.abs(x64[differ] - boundary) <= 4e-6 * max(1.0, float(np.abs(x64).max())))
        if bits <= 8:
            assert differ.sum() <= max(2, int(1e-5 * x.size)), differ.sum()
    dec = BoundaryCodec(table, 1, stage=2)
    checked = dec.check(frames)
    y = dec.decode(checked)
    expected = primitives.dequantize(ref, lo, hi, bits)
    r = table.transform(1, m)
    if r is None:
        assert np.array_equal(y, expected)
    else:
        back = (expected.astype(np.float64) @ r.T.astype(np.float64)).astype(np.float32)
        step = float(np.max((np.asarray(hi) - np.asarray(lo)) / (2 ** bits - 1)))
        assert np.max(np.abs(y - back)) <= 1e-4 * max(1.0, float(np.abs(back).max())) + step * (codes != ref).any()


def test_32_bits_is_raw_and_decodes_without_a_copy(table):
    enc, dec = BoundaryCodec(table, 0, 0, stage=0), BoundaryCodec(table, 0, stage=1)
    x = _samples(2, 197, 192)
    frames = enc.encode(x, 32, seq=1, first_id=0)
    assert bytes(frames[1]) == x.tobytes()
    y = dec.decode(dec.check(frames))
    assert np.array_equal(y, x) and np.shares_memory(y, np.frombuffer(frames[1], np.uint8))


def test_no_table_sends_an_inline_min_max():
    enc, dec = BoundaryCodec(None, stage=0), BoundaryCodec(None, stage=1)
    x = _samples(2, 10, 192)
    frames = enc.encode(x, 8, seq=1, first_id=0)
    h = wire.parse_header(frames[0])
    assert h.range_kind == wire.RangeKind.INLINE and (h.lo, h.hi) == (float(x.min()), float(x.max()))
    y = dec.decode(dec.check(frames))
    assert np.array_equal(y, primitives.dequantize(primitives.quantize(x, h.lo, h.hi, 8), h.lo, h.hi, 8))


def test_the_digest_is_hashed_once_per_load(tmp_path, table, monkeypatch):
    path = table.save(tmp_path / "t.json")
    calls = []
    real = table_module.canonical_sha256
    monkeypatch.setattr(table_module, "canonical_sha256", lambda c: calls.append(1) or real(c))
    loaded = ClipTable.load(path)
    at_load = len(calls)
    enc, dec = BoundaryCodec(loaded, 0, 2, stage=0), BoundaryCodec(loaded, 0, stage=1)
    x = _samples(2, 10, 192)
    for i in range(20):
        dec.decode(dec.check(enc.encode(x, 4, seq=i, first_id=0)))
        assert loaded.digest == dec.digest
    assert len(calls) == at_load <= 2  # the content check and the digest, at load; none per frame


def test_check_refuses_what_cannot_be_decoded(table):
    enc = BoundaryCodec(table, 0, 1, stage=0)
    x = _samples(2, 10, 192)
    frames = enc.encode(x, 4, seq=1, first_id=0)
    other = build_table(_samples(seed=9), ["aciq_pc"], [4], boundaries=1)
    for receiver, kind in ((BoundaryCodec(other, 0, stage=1), "table"), (BoundaryCodec(None, stage=1), "table")):
        with pytest.raises(FrameError) as err:
            receiver.check(frames)
        assert err.value.kind == kind
    with pytest.raises(FrameError) as err:
        BoundaryCodec(table, 0, stage=1).check([frames[0], bytes(frames[1])[:-1]])
    assert err.value.kind == "length"
    narrow = BoundaryCodec(table, 0, 1, stage=0).encode(_samples(2, 10, 192)[:, :, :96].copy(), 4, seq=2, first_id=0,
                                                         inline_range=(-1.0, 1.0))
    assert wire.parse_header(narrow[0]).range_kind == wire.RangeKind.INLINE
    with pytest.raises(ValueError, match="channels|192"):
        enc.encode(_samples(2, 10, 192)[:, :, :96].copy(), 4, seq=3, first_id=0)


def test_pooled_buffers_are_reused_only_when_nobody_holds_them():
    pool = BufferPool(depth=4)
    a = pool.get((3, 5))
    b = pool.get((3, 5))
    assert a is not b  # a is still held here
    del a
    c = pool.get((3, 5))
    view = c[1:]
    assert pool.get((3, 5)) is not c  # a view keeps its base alive
    del view, c
    before = pool.allocations
    for _ in range(50):
        pool.get((3, 5))
    assert pool.allocations == before


def test_a_stage_decodes_into_reused_buffers(table):
    m = table.method_index("rot_aciq_pc")
    enc, dec = BoundaryCodec(table, 0, m, stage=0), BoundaryCodec(table, 0, stage=1)
    x = _samples(4, 197, 192)
    for i in range(30):
        y = dec.decode(dec.check(enc.encode(x, 8, seq=i, first_id=0)))
        del y
    assert dec._pool.allocations <= 2 and enc._pool.allocations <= 2


@pytest.mark.parametrize("c", [1, 2, 16, 12, 20, 192, 256, 320, 384, 768, 100])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_fast_rotation_equals_the_dense_product(c, backend, monkeypatch):
    monkeypatch.setenv("QUANTPIPE_CODEC", backend)
    r = rotation.orthogonal_matrix(c, seed=4)
    rot = rotation.Rotation(r)
    assert rot.fast == rotation.hadamard_order_supported(c)
    x = np.random.default_rng(c).standard_normal((5, 7, c)).astype(np.float32)
    out = np.empty_like(x)
    rot.apply(x, out)
    dense = x.astype(np.float64) @ r.astype(np.float64)
    assert np.max(np.abs(out - dense)) < 1e-5 * max(1.0, np.abs(dense).max())
    back = np.empty_like(x)
    rot.invert(out, back)
    assert np.max(np.abs(back - x)) < 1e-5 * max(1.0, np.abs(x).max())


@pytest.mark.parametrize("c", [192, 256, 320, 384, 768, 1024, 96])
def test_the_register_butterfly_gives_the_bits_of_the_stagewise_one(c, monkeypatch):
    # numba's H16 kernels (four stages per pass, 16 or more groups) against numpy's stage-by-stage butterfly
    from quantpipe.quant import _kernels

    r = rotation.orthogonal_matrix(c, seed=9)
    x = np.random.default_rng(c + 1).standard_normal((9, 11, c)).astype(np.float32)
    calls = []
    for q, kernel in list(_kernels.H16.items()):  # record that the register kernel is the one that ran
        monkeypatch.setitem(_kernels.H16, q, lambda t, kernel=kernel, q=q: (calls.append(q), kernel(t)))
    got = {}
    for backend in ("fast", "reference"):
        monkeypatch.setenv("QUANTPIPE_CODEC", backend)
        rot = rotation.Rotation(r)
        out, back = np.empty_like(x), np.empty_like(x)
        rot.apply(x, out)
        rot.invert(out, back)
        got[backend] = (out, back)
    assert np.array_equal(got["fast"][0], got["reference"][0])
    assert np.array_equal(got["fast"][1], got["reference"][1])
    registers = rot.groups % 16 == 0 and rot._q in _kernels.H16_Q  # 96 = 8 groups of 12: stage by stage
    assert calls == ([rot._q, rot._q] if registers else []), (c, rot.groups, rot._q, calls)


def test_a_strided_out_is_refused_rather_than_left_unwritten():
    rot = rotation.Rotation(rotation.orthogonal_matrix(192, seed=2))
    x = np.ones((4, 192), dtype=np.float32)
    strided = np.zeros((4, 384), dtype=np.float32)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        rot.apply(x, strided)
    with pytest.raises(ValueError, match="C-contiguous"):
        rot.invert(x, strided)


def test_a_random_rotation_is_applied_densely():
    r = rotation.orthogonal_matrix(192, seed=1, kind="random")
    rot = rotation.Rotation(r)
    assert not rot.fast
    x = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
    out = np.empty_like(x)
    assert np.allclose(rot.apply(x, out), x @ r, atol=1e-5)
