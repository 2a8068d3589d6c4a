"""ONNX Runtime backend: run one stage graph with the best execution provider that is installed.

Providers are tried in the order TensorRT, CUDA, CPU, keeping only those this onnxruntime build offers
(``onnxruntime`` has only CPU; ``onnxruntime-gpu`` adds CUDA and TensorRT). An explicitly requested
provider that is not available is an error rather than a silent fallback to the CPU, because a stage
that quietly runs 50x slower breaks the pipeline's rate target in a way that is hard to diagnose.
onnxruntime is imported inside :class:`OnnxRuntimeEngine`, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quantpipe.engines.base import Engine, TensorSpec, check_input
from quantpipe.errors import ArtifactMismatchError, ConfigError, MissingDependencyError

__all__ = ["OnnxRuntimeEngine", "PREFERRED_PROVIDERS", "resolve_providers"]

log = logging.getLogger(__name__)

#: preferred order: fastest first
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# Short spellings accepted on command lines and in configs.
_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def _import_ort():  # noqa: ANN202 - returns the onnxruntime module
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "the onnxruntime backend needs onnxruntime: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA/TensorRT)"
        ) from exc
    return onnxruntime


def resolve_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Choose the execution providers for a session.

    Args:
        requested: provider names (full, e.g. ``"CUDAExecutionProvider"``, or short: ``tensorrt``, ``cuda``,
            ``cpu``) in priority order, or ``None`` for every preferred provider that is available.
        available: what ``onnxruntime.get_available_providers()`` reports.

    Returns:
        Full provider names in priority order.

    Raises:
        ConfigError: a requested provider is unknown or not available in this onnxruntime build.
    """
    if requested is None:
        chosen = [p for p in PREFERRED_PROVIDERS if p in available]
        return chosen or ["CPUExecutionProvider"]
    chosen = []
    for name in requested:
        full = _ALIASES.get(name.lower(), name)
        if full not in available:
            hint = (
                "install onnxruntime-gpu (with a matching CUDA / TensorRT) to get it"
                if full in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                else "check the spelling"
            )
            raise ConfigError(
                f"onnxruntime provider {name!r} was requested but is not available "
                f"(available: {', '.join(available)}); {hint}, or choose one of the available providers"
            )
        if full not in chosen:
            chosen.append(full)
    if not chosen:
        raise ConfigError("an empty provider list was given; pass None to choose automatically")
    return chosen


class OnnxRuntimeEngine(Engine):
    """One stage graph in an ``onnxruntime.InferenceSession``.

    Args:
        path: the stage's ``.onnx`` file.
        providers: execution providers in priority order (see :func:`resolve_providers`); ``None`` = auto.
        threads: intra-op threads (``None`` = onnxruntime's default, all cores). Set it when several stages
            share one machine so that they do not oversubscribe the cores.
        cache_dir: where the TensorRT provider keeps its engine and timing caches (default: next to the graph).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        ort = _import_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactMismatchError(f"stage graph {self.path} not found; run quantpipe export to create it")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1 (got {threads})")
        chosen = resolve_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One stage is one sequential graph: inter-op parallelism only adds thread contention.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        cache = Path(cache_dir) if cache_dir is not None else self.path.parent / "ort_trt_cache"
        provider_args: list[str | tuple[str, dict[str, str]]] = []
        for name in chosen:
            if name == "TensorrtExecutionProvider":
                # Persist the TensorRT engines ORT builds, otherwise every start rebuilds them (minutes).
                provider_args.append(
                    (
                        name,
                        {
                            "trt_engine_cache_enable": "True",
                            "trt_engine_cache_path": str(cache),
                            "trt_timing_cache_enable": "True",
                            "trt_timing_cache_path": str(cache),
                        },
                    )
                )
            else:
                provider_args.append(name)
        self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=provider_args)
        self.providers = list(self._session.get_providers())
        self.threads = threads
        log.info("%s: onnxruntime %s, providers %s", self.path.name, ort.__version__, ", ".join(self.providers))
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactMismatchError(
                f"{self.path} has {len(inputs)} inputs and {len(outputs)} outputs; a quantpipe stage has exactly one "
                "of each. Use a graph written by quantpipe export"
            )
        self._input = _spec(inputs[0])
        self._output = _spec(outputs[0])

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch.

        Raises:
            ArtifactMismatchError: the batch's shape does not fit the stage's input (e.g. it came from a
                stage of another export).
        """
        check_input(self._input, x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self._session.run([self._output.name], {self._input.name: x})[0]

    def describe(self) -> str:
        threads = "default" if self.threads is None else str(self.threads)
        return f"onnxruntime [{', '.join(self.providers)}] threads={threads} fp32 {self.path.name}"

    def close(self) -> None:
        # InferenceSession has no explicit close; dropping the last reference frees its memory.
        self._session = None


def _spec(arg) -> TensorSpec:  # noqa: ANN001 - onnxruntime.NodeArg
    # onnxruntime reports symbolic dims as strings ("batch") or None: both are dynamic.
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(arg.type)
    if dtype is None:
        raise ArtifactMismatchError(f"tensor {arg.name} has type {arg.type}; quantpipe stages use float32")
    return TensorSpec(name=arg.name, shape=shape, dtype=np.dtype(dtype))

