"""The CUDA kernels of the GPU codec (``kernels.cu``), compiled by NVRTC through CuPy, and their launchers.

Used only after :func:`quantpipe.quant.gpu.available` found CuPy and a device. CuPy is imported when a
function here first runs, never at import time (a CPU-only device may import this module and load no
GPU library).

CuPy compiles the source for the device it runs on (sm_90 on an H200, sm_87 on a Jetson Orin) the first
time, and caches the machine code on disk (``~/.cupy/kernel_cache``), so a daemon's later starts load it.
All launches go to CuPy's current stream.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from quantpipe.quant.primitives import QUANT_BITS

_SOURCE = (Path(__file__).with_name("kernels.cu")).read_text()
_OPTIONS = ("-std=c++14",)
_THREADS = 256
_ROT_WARPS = 4  # WARPS in kernels.cu


def _cupy():
    import cupy

    return cupy


@functools.cache
def _plain_module():
    names = [f"enc_plain<{b}>" for b in QUANT_BITS] + [f"dec_plain<{b}>" for b in QUANT_BITS] + ["count_nan"]
    return _cupy().RawModule(code=_SOURCE, options=_OPTIONS, name_expressions=names)


@functools.cache
def _rot_module(base_bytes: bytes, q: int, p: int):
    """The rotated kernels for base order ``q`` and ``p`` groups per lane; the base matrix is baked in."""
    base = np.frombuffer(base_bytes, np.float32)
    literal = ",".join(f"{v:.1f}f" for v in base)
    prefix = f"#define QP_ROT\n#define Q {q}\n#define P {p}\n__constant__ float c_base[{q * q}] = {{{literal}}};\n"
    names = [f"enc_rot<{b}>" for b in QUANT_BITS] + [f"dec_rot<{b}>" for b in QUANT_BITS]
    return _cupy().RawModule(code=prefix + _SOURCE, options=_OPTIONS, name_expressions=names)


@functools.cache
def _sm_count() -> int:
    return int(_cupy().cuda.Device().attributes["MultiProcessorCount"])


def _grid(work_items: int, per_block: int, waves: int = 16) -> int:
    return max(1, min((work_items + per_block - 1) // per_block, _sm_count() * waves))


def warmup(bits: tuple[int, ...] = QUANT_BITS) -> None:
    """Compile (or load from CuPy's cache) the plain kernels."""
    mod = _plain_module()
    for b in bits:
        mod.get_function(f"enc_plain<{b}>")
        mod.get_function(f"dec_plain<{b}>")
    mod.get_function("count_nan")


def encode_plain(x: object, bits: int, lo: object, inv: object, out: object, nan_count: object) -> None:
    """Quantize + pack flat float32 ``x`` (16-byte aligned) into uint8 ``out``; NaNs are added to ``nan_count``."""
    n = int(x.size)
    fn = _plain_module().get_function(f"enc_plain<{bits}>")
    fn((_grid((n + 3) // 4, _THREADS),), (_THREADS,),
       (x, np.int64(n), lo, inv, np.int32(lo.size), out, np.int64(out.size), nan_count))


def decode_plain(payload: object, bits: int, step: object, lo: object, y: object) -> None:
    """Unpack + dequantize uint8 ``payload`` into flat float32 ``y`` (16-byte aligned)."""
    n = int(y.size)
    fn = _plain_module().get_function(f"dec_plain<{bits}>")
    fn((_grid((n + 3) // 4, _THREADS),), (_THREADS,),
       (payload, np.int64(n), np.int64(payload.size), step, lo, np.int32(lo.size), y))


def count_nan(x: object, nan_count: object) -> None:
    n = int(x.size)
    _plain_module().get_function("count_nan")((_grid(n, _THREADS),), (_THREADS,), (x, np.int64(n), nan_count))


#: most values a lane holds in registers (P * Q) in the fused rotation kernels
MAX_LANE_VALUES = 32


class FastRotation:
    """A randomized Hadamard rotation on the device, in the form of :class:`quantpipe.quant.rotation.Rotation`:
    scaled signs ``[C]`` (device), ``groups`` = G butterfly groups (a power of two) of Q channels each."""

    @staticmethod
    def supports(channels: int, groups: int, q: int) -> bool:
        p = max(1, groups // 32)
        return (q % 4 == 0 and groups >= 1 and groups & (groups - 1) == 0 and groups * q == channels
                and p * q <= MAX_LANE_VALUES)

    def __init__(self, channels: int, groups: int, q: int, scaled_signs: np.ndarray, base: np.ndarray) -> None:
        self.channels, self.groups, self.q = int(channels), int(groups), int(q)
        self.p = max(1, self.groups // 32)
        self.signs = _cupy().asarray(np.ascontiguousarray(scaled_signs, dtype=np.float32))
        self._base_bytes = np.ascontiguousarray(base, dtype=np.float32).tobytes()
        self.module = _rot_module(self._base_bytes, self.q, self.p)

    def warmup(self, bits: tuple[int, ...]) -> None:
        for b in bits:
            self.module.get_function(f"enc_rot<{b}>")
            self.module.get_function(f"dec_rot<{b}>")

    def encode(self, x: object, bits: int, lo: object, inv: object, out: object,
               nan_count: object) -> None:
        rows = int(x.size) // self.channels
        units = (rows * self.groups // self.p + 31) // 32
        fn = self.module.get_function(f"enc_rot<{bits}>")
        fn((_grid(units, _ROT_WARPS, 32),), (32 * _ROT_WARPS,),
           (x, np.int64(rows), np.int32(self.channels), np.int32(self.groups), self.signs, lo, inv,
            np.int32(lo.size > 1), out, np.int64(out.size), nan_count))

    def decode(self, payload: object, bits: int, step: object, lo: object, y: object) -> None:
        rows = int(y.size) // self.channels
        units = (rows * self.groups // self.p + 31) // 32
        fn = self.module.get_function(f"dec_rot<{bits}>")
        fn((_grid(units, _ROT_WARPS, 32),), (32 * _ROT_WARPS,),
           (payload, np.int64(rows), np.int32(self.channels), np.int32(self.groups), self.signs, step, lo,
            np.int32(lo.size > 1), np.int64(payload.size), y))
