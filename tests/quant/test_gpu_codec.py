"""The GPU codec (quantpipe.quant.gpu) against the numpy reference and the CPU codec.

Tests marked ``gpu`` need CuPy and a CUDA device and skip cleanly elsewhere; the rest (the import
promise, available() never raising) run everywhere, CI included.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from quantpipe import wire
from quantpipe.benchmarks.pipeline import build_table
from quantpipe.quant import gpu, packing, primitives
from quantpipe.quant.codec import NonFiniteInputError
from quantpipe.quant.linkcodec import BoundaryCodec

BITS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
# per tensor, per channel, rotated per tensor and per channel
METHODS = ["aciq", "aciq_pc", "rot_aciq", "rot_mse_pc"]


def test_importing_the_package_loads_no_gpu_library_and_available_never_raises():
    code = ("import json, sys, quantpipe.quant.gpu as g, quantpipe.quant.gpu.codec, quantpipe.quant.gpu._cuda; "
            "mods = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'numba_cuda', 'triton', 'torch')); "
            "print(json.dumps(mods))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
    ok = gpu.available()
    assert isinstance(ok, bool)
    assert (gpu.unavailable_reason() == "") == ok


def test_is_device_array():
    assert not gpu.is_device_array(np.zeros(3))

    class Fake:
        __cuda_array_interface__ = {}

    assert gpu.is_device_array(Fake())


# ------------------------------------------------------------------------------------------ on a GPU
needs_gpu = pytest.mark.skipif(not gpu.available(), reason=f"GPU codec unavailable: {gpu.unavailable_reason()}")


def _samples(n=48, t=10, c=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.laplace(0, 0.5, size=(n, t, c)).astype(np.float32)
    x[:, :, 7] *= 25.0
    return x


@pytest.fixture(scope="module")
def table():
    return build_table(_samples(), METHODS, BITS, boundaries=2)


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


_REPORT: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_report():
    yield
    if _REPORT:
        print("\nGPU codec vs CPU codec and reference (rotated: codes that differ / values):")
        print("\n".join(_REPORT))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(4, 197, 192), (1, 3, 192)])
def test_gpu_encode_decode_match_cpu_and_reference(table, cp, name, bits, shape):
    m = table.method_index(name)
    x = _samples(*shape, seed=bits)
    gpu_enc = gpu.GpuBoundaryCodec(table, 1, m, stage=1)
    cpu_enc = BoundaryCodec(table, 1, m, stage=1, reuse_buffers=False)
    frames = gpu_enc.encode(cp.asarray(x), bits, seq=7, first_id=3)
    cpu_frames = cpu_enc.encode(x, bits, seq=7, first_id=3)
    assert isinstance(frames[1], np.ndarray) and frames[1].dtype == np.uint8  # host (pinned) payload
    assert bytes(frames[0]) == bytes(cpu_frames[0])  # same header
    r = table.transform(1, m)
    lo, hi = table.ranges(1, m, bits)
    codes = packing.unpack(frames[1], x.size, bits).reshape(x.shape)
    cpu_codes = packing.unpack(np.asarray(cpu_frames[1]), x.size, bits).reshape(x.shape)
    if r is None:
        assert bytes(frames[1]) == bytes(cpu_frames[1])  # byte-exact
        assert np.array_equal(codes, primitives.quantize(x, lo, hi, bits))
    else:
        xr = (x.astype(np.float64) @ r.astype(np.float64)).astype(np.float32)
        ref = primitives.quantize(xr, lo, hi, bits)
        vs_cpu = int(np.count_nonzero(codes != cpu_codes))
        vs_ref = codes != ref
        # any code that differs from the reference's is off by one, at a value within float32
        # rounding of the boundary between the two codes
        assert np.all(np.abs(codes.astype(int) - ref.astype(int))[vs_ref] == 1)
        x64 = x.astype(np.float64) @ r.astype(np.float64)
        lo64 = np.broadcast_to(np.asarray(lo, np.float64), x.shape)[vs_ref]
        step = (np.broadcast_to(np.asarray(hi, np.float64), x.shape)[vs_ref] - lo64) / (2 ** bits - 1)
        edge = lo64 + (np.minimum(codes, ref)[vs_ref] + 0.5) * step
        assert np.all(np.abs(x64[vs_ref] - edge) <= 4e-6 * max(1.0, float(np.abs(x64).max())))
        _REPORT.append(f"  {name:>10} {bits:>2} bits {str(shape):>14}: vs CPU codec {vs_cpu}/{x.size}, "
                       f"vs float64 reference {int(vs_ref.sum())}/{x.size}")
        assert vs_cpu <= max(1, int(1e-5 * x.size)), vs_cpu  # the same butterfly and summation order as the CPU
    # decode on the GPU = decode on the CPU, from either sender's frame
    gpu_dec = gpu.GpuBoundaryCodec(table, 1, stage=2)
    cpu_dec = BoundaryCodec(table, 1, stage=2, reuse_buffers=False)
    for f in (frames, cpu_frames):
        y_gpu = cp.asnumpy(gpu_dec.decode(gpu_dec.check(f)))
        y_cpu = cpu_dec.decode(cpu_dec.check(f))
        if r is None:
            assert np.array_equal(y_gpu, y_cpu)
        else:
            np.testing.assert_allclose(y_gpu, y_cpu, rtol=0, atol=2e-6 * max(1.0, float(np.abs(y_cpu).max())))


@needs_gpu
@pytest.mark.gpu
def test_gpu_32_bits_inline_nan_and_pooling(table, cp):
    x = _samples(2, 197, 192, seed=11)
    enc = gpu.GpuBoundaryCodec(table, 0, 0, stage=0)
    dec = gpu.GpuBoundaryCodec(table, 0, stage=1)
    frames = enc.encode(cp.asarray(x), 32, seq=1, first_id=0)
    assert bytes(frames[1]) == x.tobytes()
    assert np.array_equal(cp.asnumpy(dec.decode(dec.check(frames))), x)
    # no table: a per-tensor min-max range travels inline, as on the CPU
    plain_enc, plain_dec = gpu.GpuBoundaryCodec(None, stage=0), BoundaryCodec(None, stage=1, reuse_buffers=False)
    for bits in (2, 8, 16):
        f = plain_enc.encode(cp.asarray(x), bits, seq=2, first_id=0)
        cpu_f = BoundaryCodec(None, stage=0, reuse_buffers=False).encode(x, bits, seq=2, first_id=0)
        assert bytes(f[0]) == bytes(cpu_f[0]) and bytes(f[1]) == bytes(cpu_f[1])
        assert np.array_equal(cp.asnumpy(gpu.GpuBoundaryCodec(None).decode(plain_dec.check(f))),
                              plain_dec.decode(plain_dec.check(f)))
    bad = x.copy()
    bad[1, 5, 9] = np.nan
    bad[0, 0, 0] = np.nan
    for bits in (32, 8):
        with pytest.raises(NonFiniteInputError, match="2 NaN"):
            enc.encode(cp.asarray(bad), bits, seq=3, first_id=0)
    # a payload still referenced (queued in libzmq, in custody) is never overwritten
    a = enc.encode(cp.asarray(x), 8, seq=4, first_id=0)[1]
    b = enc.encode(cp.asarray(x * 2), 8, seq=5, first_id=0)[1]
    assert a.ctypes.data != b.ctypes.data
    del a
    c = enc.encode(cp.asarray(x), 8, seq=6, first_id=0)[1]
    assert c.ctypes.data != b.ctypes.data
    # a numpy input goes through the CPU codec
    assert bytes(enc.encode(x, 8, seq=7, first_id=0)[1]) == bytes(BoundaryCodec(table, 0, 0, stage=0).encode(
        x, 8, seq=7, first_id=0)[1])
    for name in ("aciq_pc", "rot_mse_pc"):
        pc = gpu.GpuBoundaryCodec(table, 0, table.method_index(name), stage=0)
        with pytest.raises(ValueError, match="channels|last axis"):
            pc.encode(cp.asarray(x[..., :96].copy()), 8, seq=8, first_id=0)


@needs_gpu
@pytest.mark.gpu
def test_gpu_dense_rotation_fallback(cp):
    """C = 56 has no Hadamard matrix here: the table stores a random orthogonal one, run as a cuBLAS product."""
    t = build_table(_samples(c=56), ["rot_aciq_pc"], [4, 8], boundaries=1)
    x = _samples(3, 7, 56, seed=5)
    enc, dec = gpu.GpuBoundaryCodec(t, 0, 0, stage=0), BoundaryCodec(t, 0, stage=1, reuse_buffers=False)
    gdec = gpu.GpuBoundaryCodec(t, 0, stage=1)
    for bits in (4, 8):
        f = enc.encode(cp.asarray(x), bits, seq=1, first_id=0)
        cpu_f = BoundaryCodec(t, 0, 0, stage=0, reuse_buffers=False).encode(x, bits, seq=1, first_id=0)
        differ = np.count_nonzero(packing.unpack(f[1], x.size, bits) != packing.unpack(np.asarray(cpu_f[1]), x.size, bits))
        assert differ <= 2, differ  # cuBLAS and numpy sum in other orders: only boundary values may differ
        y = dec.decode(dec.check(f))
        np.testing.assert_allclose(cp.asnumpy(gdec.decode(gdec.check(f))), y, atol=1e-5)
        assert wire.parse_header(bytes(f[0])).bits == bits


def test_the_environment_can_turn_the_gpu_codec_off(monkeypatch):
    monkeypatch.setenv("QUANTPIPE_GPU_CODEC", "off")
    assert gpu.available() is False
    assert "QUANTPIPE_GPU_CODEC" in gpu.unavailable_reason()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_gpu_vit_base_width_codes_equal_the_cpu_codec(cp, bits):
    """C = 768 = 64 butterfly groups: more groups than lanes, so each lane holds two (P = 2)."""
    t = build_table(_samples(c=768), ["aciq_pc", "rot_mse_pc"], [2, 3, 8, 16], boundaries=1)
    x = _samples(3, 11, 768, seed=bits)
    for m in range(2):
        f = gpu.GpuBoundaryCodec(t, 0, m, stage=0).encode(cp.asarray(x), bits, seq=1, first_id=0)
        cpu_f = BoundaryCodec(t, 0, m, stage=0, reuse_buffers=False).encode(x, bits, seq=1, first_id=0)
        differ = int(np.count_nonzero(packing.unpack(f[1], x.size, bits) != packing.unpack(np.asarray(cpu_f[1]), x.size, bits)))
        _REPORT.append(f"  {t.methods[m]:>10} {bits:>2} bits (3, 11, 768): vs CPU codec {differ}/{x.size}")
        assert differ <= max(1, int(1e-5 * x.size))
        dec, gdec = BoundaryCodec(t, 0, stage=1, reuse_buffers=False), gpu.GpuBoundaryCodec(t, 0, stage=1)
        y = dec.decode(dec.check(f))
        np.testing.assert_allclose(cp.asnumpy(gdec.decode(gdec.check(f))), y, rtol=0,
                                   atol=2e-6 * max(1.0, float(np.abs(y).max())))
