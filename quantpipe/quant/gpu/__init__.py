"""The boundary codec on a CUDA GPU: rotate, clip, quantize and pack on the device, before the copy to the host.

A stage whose engine runs on a GPU (``engine.device == "cuda"``) keeps its tensors in device memory:
:class:`GpuBoundaryCodec` (a :class:`quantpipe.quant.linkcodec.BoundaryCodec`) encodes the engine's
device output in place and copies only the packed payload to pinned host memory (4 to 16 times fewer
bytes across the bus than the float32 tensor), and decodes a received payload on the device into the
next engine's input. Same codes and the same bitstream as the numpy reference, so a GPU sender and a
CPU receiver (and the reverse) interoperate.

The kernels are CUDA C++ compiled at run time by NVRTC through CuPy (see ``kernels.cu`` and
ARCHITECTURE.md for why CuPy). Nothing here imports CuPy until :func:`available` or the codec is used,
so importing this package on a CPU-only device costs nothing and loads no GPU library.

``QUANTPIPE_GPU_CODEC=off`` makes :func:`available` False (a stage with a GPU engine then runs the CPU
codec and ``engine.run``, copying float32 tensors through the host: the comparison path).
"""

from __future__ import annotations

import functools
import logging
import os

__all__ = ["available", "unavailable_reason", "GpuBoundaryCodec", "is_device_array"]

log = logging.getLogger(__name__)


@functools.cache
def _probe() -> str:
    """'' when CuPy imports, sees a CUDA device and compiles the kernels; else why not (never raises)."""
    try:
        import cupy as cp
    except Exception as exc:  # ImportError, or a CuPy that cannot find its CUDA libraries
        return f"cupy does not import ({exc.__class__.__name__}: {exc}); pip install 'quantpipe[gpu]'"
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
        from quantpipe.quant.gpu import _cuda

        _cuda.warmup()
    except Exception as exc:  # noqa: BLE001 - a driver or compiler failure of any kind means "not available"
        return f"CUDA device or kernel compilation failed ({exc.__class__.__name__}: {exc})"
    return ""


def _disabled() -> bool:
    return os.environ.get("QUANTPIPE_GPU_CODEC", "").strip().lower() in ("off", "0", "false", "no", "cpu")


def available() -> bool:
    """Whether the GPU codec can run here: CuPy imports, a CUDA device is present and the kernels compile.

    Never raises; the first call compiles (or loads from CuPy's on-disk cache) the kernels.
    ``QUANTPIPE_GPU_CODEC=off`` makes it False without importing CuPy."""
    return not _disabled() and _probe() == ""


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    return "disabled by QUANTPIPE_GPU_CODEC=off" if _disabled() else _probe()


def is_device_array(a: object) -> bool:
    """Whether ``a`` is a CUDA device array (CuPy, or anything exposing ``__cuda_array_interface__``)."""
    return hasattr(a, "__cuda_array_interface__")


def __getattr__(name: str):  # lazy: the codec module imports cupy
    if name == "GpuBoundaryCodec":
        from quantpipe.quant.gpu.codec import GpuBoundaryCodec

        return GpuBoundaryCodec
    raise AttributeError(name)
