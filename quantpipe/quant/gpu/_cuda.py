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


def _base_constant(base_bytes: bytes, q: int) -> str:
    """The Q x Q base matrix (+-1 entries, row-major) as the `c_base` constant of a rotated module."""
    literal = ",".join(f"{v:.1f}f" for v in np.frombuffer(base_bytes, np.float32))
    return f"__constant__ float c_base[{q * q}] = {{{literal}}};\n"


@functools.cache
def _rot_module(base_bytes: bytes, q: int, p: int):
    """The rotated kernels for base order ``q`` and ``p`` groups per lane; the base matrix is baked in."""
    prefix = f"#define QP_ROT\n#define Q {q}\n#define P {p}\n" + _base_constant(base_bytes, q)
    names = [f"enc_rot<{b}>" for b in QUANT_BITS] + [f"dec_rot<{b}>" for b in QUANT_BITS]
    return _cupy().RawModule(code=prefix + _SOURCE, options=_OPTIONS, name_expressions=names)


@functools.cache
def _sm_count() -> int:
    return int(_cupy().cuda.Device().attributes["MultiProcessorCount"])


@functools.cache
def _tiled_module(base_bytes: bytes, q: int, log_g: int, srow: int):
    """The tiled rotated kernels for base order ``q`` and ``2**log_g`` groups; the base matrix is baked in."""
    prefix = f"#define QP_TILED\n#define Q {q}\n#define LOG_G {log_g}\n#define SROW {srow}\n" + _base_constant(base_bytes, q)
    names = [f"enc_tiled<{b}>" for b in QUANT_BITS] + [f"dec_tiled<{b}>" for b in QUANT_BITS]
    return _cupy().RawModule(code=prefix + _SOURCE, options=_OPTIONS, name_expressions=names)


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


class TiledRotation:
    """The same rotation and codes as :class:`FastRotation`, computed by the tiled kernels (``enc_tiled`` /
    ``dec_tiled`` in kernels.cu): a block stages ``tile_rows`` rows in shared memory and runs the butterfly
    in registers, one thread per (row, channel), instead of through warp shuffles.

    ``tile_rows`` and ``threads`` are chosen from the tensor's rows unless given (benchmarks sweep them).
    """

    #: dynamic shared memory a block may use without opting in to more (48 KiB on every CUDA GPU)
    SMEM_LIMIT = 48 * 1024
    TARGET_VALUES = 3072  # values per tile: enough work per block, several blocks per SM

    @staticmethod
    def supports(channels: int, groups: int, q: int) -> bool:
        return (q % 4 == 0 and q <= 32 and groups >= 1 and groups & (groups - 1) == 0 and groups * q == channels
                and channels % 8 == 0 and groups <= 128
                and TiledRotation._smem(2, channels, q, groups) <= TiledRotation.SMEM_LIMIT)

    @staticmethod
    def _srow(channels: int, q: int, groups: int) -> int:
        log_g = groups.bit_length() - 1
        last = min(log_g, 5)
        w = q << (log_g - last)  # items per row of the last butterfly pass: rows start that many banks apart
        return channels + (w - channels) % 32

    @staticmethod
    def _smem(tile_rows: int, channels: int, q: int, groups: int) -> int:
        return tile_rows * TiledRotation._srow(channels, q, groups) * 4

    def __init__(self, channels: int, groups: int, q: int, scaled_signs: np.ndarray, base: np.ndarray, *,
                 tile_rows: int | None = None, threads: int | None = None, blocks_per_sm: int | None = None) -> None:
        self.channels, self.groups, self.q = int(channels), int(groups), int(q)
        self.log_g = self.groups.bit_length() - 1
        self.srow = self._srow(self.channels, self.q, self.groups)
        self.signs = _cupy().asarray(np.ascontiguousarray(scaled_signs, dtype=np.float32))
        self._base_bytes = np.ascontiguousarray(base, dtype=np.float32).tobytes()
        self.module = _tiled_module(self._base_bytes, self.q, self.log_g, self.srow)
        self.tile_rows, self.threads, self.blocks_per_sm = tile_rows, threads, blocks_per_sm

    def warmup(self, bits: tuple[int, ...]) -> None:
        for b in bits:
            self.module.get_function(f"enc_tiled<{b}>")
            self.module.get_function(f"dec_tiled<{b}>")

    def launch(self, rows: int) -> tuple[int, int, int, int]:
        """(grid, threads, tile rows, shared bytes) for a tensor of ``rows`` rows."""
        r_max = max(2, min(self.TARGET_VALUES // self.channels, 64))
        while r_max > 2 and self._smem(r_max, self.channels, self.q, self.groups) > self.SMEM_LIMIT:
            r_max -= 2
        # several tiles per SM when the tensor is small, so that loads of some overlap the work of others
        r = self.tile_rows or max(2, min(r_max, rows // (6 * _sm_count())))
        threads = self.threads or 128
        tiles = (rows + r - 1) // r
        # blocks_per_sm < tiles per SM: each block loops over several tiles (grid stride)
        cap = _sm_count() * (self.blocks_per_sm or 16)
        return max(1, min(tiles, cap)), threads, r, self._smem(r, self.channels, self.q, self.groups)

    def encode(self, x: object, bits: int, lo: object, inv: object, out: object, nan_count: object) -> None:
        rows = int(x.size) // self.channels
        grid, threads, r, smem = self.launch(rows)
        self.module.get_function(f"enc_tiled<{bits}>")(
            (grid,), (threads,), (x, np.int64(rows), np.int32(r), self.signs, lo, inv, np.int32(lo.size > 1), out,
                                  np.int64(out.size), nan_count), shared_mem=smem)

    def decode(self, payload: object, bits: int, step: object, lo: object, y: object) -> None:
        rows = int(y.size) // self.channels
        grid, threads, r, smem = self.launch(rows)
        self.module.get_function(f"dec_tiled<{bits}>")(
            (grid,), (threads,), (payload, np.int64(rows), np.int32(r), self.signs, step, lo, np.int32(lo.size > 1),
                                  np.int64(payload.size), y), shared_mem=smem)
