"""Engines: one stage graph compiled for a backend, behind the :class:`Engine` interface.

:func:`load_engine` is what the calibration, evaluation and runtime code call. Backends import their
runtime library (onnxruntime, tensorrt) only when an engine is created, and nothing here imports torch
or timm, so a stage daemon on a device needs neither.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from quantpipe.engines.base import Engine, TensorSpec, check_input
from quantpipe.errors import ConfigError

__all__ = ["Engine", "TensorSpec", "check_input", "load_engine", "BACKENDS", "tensorrt_available"]

BACKENDS = ("auto", "onnxruntime", "tensorrt")

# Serialized TensorRT engines; everything else is treated as an ONNX graph.
_PLAN_SUFFIXES = (".plan", ".engine", ".trt")


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` Python package imports here (it needs an NVIDIA driver to run)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def load_engine(
    path: str | os.PathLike[str],
    backend: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    **options: object,
) -> Engine:
    """Load one stage as an engine.

    Args:
        path: a stage graph (``stageN.onnx``, e.g. ``manifest.stage_path(n)``) or a serialized TensorRT engine
            (``.plan`` / ``.engine``).
        backend: ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"``: a ``.plan`` file loads with TensorRT, an
            ``.onnx`` graph with onnxruntime (whose own provider order already prefers TensorRT and CUDA).
            ``"tensorrt"`` with an ``.onnx`` graph builds the engine, or reuses a cached one whose engine
            manifest still matches (see :func:`quantpipe.engines.tensorrt.build_engine`).
        providers: onnxruntime execution providers in priority order (``None`` = every available one of
            TensorRT, CUDA, CPU). Only for the onnxruntime backend.
        threads: onnxruntime intra-op threads; set it when several stages share one machine.
        **options: backend-specific keywords (tensorrt: ``fp16``, ``batch=(min, opt, max)``,
            ``cache_dir``, ``timing_cache``).

    Returns:
        An :class:`Engine` with ``.input``, ``.output``, ``.run(x)``, ``.describe()``, ``.close()``.

    Raises:
        ConfigError: unknown backend, or options that do not apply to the chosen backend.
        MissingDependencyError: the backend's library is not installed.
        ArtifactMismatchError: the file is missing or is not a quantpipe stage.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    p = Path(path)
    is_plan = p.suffix.lower() in _PLAN_SUFFIXES
    if backend == "auto":
        backend = "tensorrt" if is_plan else "onnxruntime"
    if backend == "onnxruntime":
        if is_plan:
            raise ConfigError(f"{p} is a serialized TensorRT engine; load it with backend='tensorrt'")
        from quantpipe.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(p, providers=providers, threads=threads, **options)  # type: ignore[arg-type]
    if providers is not None:
        raise ConfigError("providers apply to the onnxruntime backend only; the tensorrt backend runs on the GPU")
    from quantpipe.engines import tensorrt as trt_backend

    if is_plan:
        return trt_backend.TensorRTEngine(p)
    return trt_backend.engine_for_onnx(p, **options)  # type: ignore[arg-type]
