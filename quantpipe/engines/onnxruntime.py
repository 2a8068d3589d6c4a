"""ONNX Runtime backend: run one stage graph with the best execution provider that is installed.

Providers are tried in the order TensorRT, CUDA, CPU, keeping only those this onnxruntime build offers
(``onnxruntime`` has only CPU; ``onnxruntime-gpu`` adds CUDA and TensorRT). An explicitly requested
provider that is not available is an error rather than a silent fallback to the CPU, because a stage
that quietly runs 50x slower breaks the pipeline's rate target in a way that is hard to diagnose.
onnxruntime is imported inside :class:`OnnxRuntimeEngine`, so importing this module costs nothing.

Being *listed* is not enough: ``onnxruntime-gpu`` lists TensorrtExecutionProvider on every machine,
also one without the TensorRT libraries, and a session asked for it prints an "EP Error" block and
retries without it. Before a session is created, each GPU provider's shared library is loaded
(:func:`provider_load_error`); automatic choice drops one that cannot load, saying why in the one log
line that names the providers used, and an explicit request for it is a :class:`ConfigError`.

With CUDA (or TensorRT) first, :attr:`OnnxRuntimeEngine.device` is ``"cuda"`` and
:meth:`OnnxRuntimeEngine.run_device` runs a batch held in device memory through IOBinding, returning
the output in device memory (CuPy arrays; CuPy is imported only then).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quantpipe.engines.base import Engine, TensorSpec, check_input
from quantpipe.errors import ArtifactMismatchError, ConfigError, MissingDependencyError

__all__ = ["OnnxRuntimeEngine", "PREFERRED_PROVIDERS", "resolve_providers", "provider_load_error", "loadable_providers"]

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


#: the shared library each GPU provider lives in (onnxruntime-gpu's layout: onnxruntime/capi/)
_PROVIDER_LIBS = {
    "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
    "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _dlopen(path: Path) -> str:
    try:
        shared = path.with_name("libonnxruntime_providers_shared.so")
        if shared.is_file():  # the providers resolve their host symbols from it
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(path))
    except OSError as exc:
        return str(exc)
    return ""


@functools.cache
def provider_load_error(name: str) -> str:
    """'' if provider ``name``'s shared library (and so every library it needs) loads here, else why not.

    A provider that is not a separate library here (CPU, or another packaging of onnxruntime) is taken
    as loadable. For CUDA, onnxruntime's ``preload_dlls()`` (CUDA and cuDNN from the nvidia-* wheels) is
    tried before giving up.
    """
    lib = _PROVIDER_LIBS.get(name)
    if lib is None or not sys.platform.startswith("linux"):
        return ""
    ort = _import_ort()
    path = Path(ort.__file__).parent / "capi" / lib
    if not path.is_file():
        return ""
    error = _dlopen(path)
    if error and name == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls(cuda=True, cudnn=True, msvc=False, directory=None)
        except Exception:  # noqa: BLE001 - best effort; the retry below says what is missing
            pass
        error = _dlopen(path)
    return error


def loadable_providers(chosen: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``chosen`` without the providers whose library cannot load, and ``{provider: why}`` of those dropped."""
    kept, dropped = [], {}
    for name in chosen:
        error = provider_load_error(name)
        if error:
            dropped[name] = error
        else:
            kept.append(name)
    return kept or ["CPUExecutionProvider"], dropped


def _short(error: str) -> str:
    """The loader's message without the path of the library that needed the missing one."""
    return error.split(": ", 1)[-1] if ": " in error else error


class OnnxRuntimeEngine(Engine):
    """One stage graph in an ``onnxruntime.InferenceSession``.

    Args:
        path: the stage's ``.onnx`` file.
        providers: execution providers in priority order (see :func:`resolve_providers`); ``None`` = auto.
        threads: intra-op threads (``None`` = onnxruntime's default, all cores). Set it when several stages
            share one machine so that they do not oversubscribe the cores.
        cache_dir: where the TensorRT provider keeps its engine and timing caches (default: next to the graph).
        tf32: let the CUDA provider run float32 matmuls and convolutions as TF32 (faster, about 1e-3
            relative error). Off by default: "fp32" means float32, as the TensorRT backend builds it.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        tf32: bool = False,
    ) -> None:
        ort = _import_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactMismatchError(f"stage graph {self.path} not found; run quantpipe export to create it")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1 (got {threads})")
        chosen = resolve_providers(providers, ort.get_available_providers())
        chosen, dropped = loadable_providers(chosen)
        if dropped and providers is not None:
            name, why = next(iter(dropped.items()))
            raise ConfigError(
                f"onnxruntime provider {name} was requested but cannot load here ({_short(why)}); install the "
                "libraries it needs (TensorRT: pip install tensorrt; CUDA: a matching CUDA and cuDNN), or "
                f"choose another provider"
            )
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
            elif name == "CUDAExecutionProvider":
                provider_args.append((name, {"use_tf32": "1" if tf32 else "0"}))
            else:
                provider_args.append(name)
        self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=provider_args)
        self.providers = list(self._session.get_providers())
        self.threads = threads
        self.tf32 = bool(tf32)
        self.skipped_providers = {name: _short(why) for name, why in dropped.items()}
        skipped = "".join(f"; {name} skipped: cannot load ({why})" for name, why in self.skipped_providers.items())
        log.info("%s: onnxruntime %s, providers %s%s", self.path.name, ort.__version__, ", ".join(self.providers), skipped)
        self._io = None
        self._outputs: dict[tuple, list] = {}
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

    @property
    def device(self) -> str:
        """``"cuda"`` when the first provider is CUDA or TensorRT, else ``"cpu"``."""
        return "cuda" if self.providers and self.providers[0] in _GPU_PROVIDERS else "cpu"

    def run_device(self, x):  # noqa: ANN001, ANN201 - CuPy arrays
        """Run one batch held in device memory; the output stays in device memory (IOBinding, no host copy).

        ``x`` is a float32 CuPy array (or anything with ``__cuda_array_interface__``) of the input's
        shape; the result is a CuPy array from a small pool, reused once the caller drops it. Work queued on
        CuPy's current stream (a decode that wrote ``x``) is finished first.
        """
        if self.device != "cuda":
            return super().run_device(x)
        import cupy as cp

        check_input(self._input, x)
        x = cp.ascontiguousarray(cp.asarray(x), dtype=cp.float32)
        rest = self._output.shape[1:]
        if any(d is None for d in rest):
            raise ArtifactMismatchError(f"{self.path.name}: only the batch axis of the output may be dynamic")
        shape = (int(x.shape[0]), *(int(d) for d in rest))
        y = self._output_buffer(cp, shape)
        device_id = int(cp.cuda.Device().id)
        if self._io is None:
            self._io = self._session.io_binding()
        cp.cuda.get_current_stream().synchronize()
        self._io.bind_input(self._input.name, "cuda", device_id, np.float32, list(x.shape), x.data.ptr)
        self._io.bind_output(self._output.name, "cuda", device_id, np.float32, list(shape), y.data.ptr)
        self._session.run_with_iobinding(self._io)
        self._io.synchronize_outputs()
        return y

    def _output_buffer(self, cp, shape: tuple[int, ...]):  # noqa: ANN001, ANN202
        kept = self._outputs.setdefault(shape, [])
        for buf in kept:
            if sys.getrefcount(buf) <= 3:  # only this list holds it: the previous result was dropped
                return buf
        buf = cp.empty(shape, dtype=cp.float32)
        if len(kept) < 4:
            kept.append(buf)
        return buf

    def describe(self) -> str:
        threads = "default" if self.threads is None else str(self.threads)
        precision = "tf32" if self.tf32 and self.device == "cuda" else "fp32"
        return f"onnxruntime [{', '.join(self.providers)}] threads={threads} {precision} {self.path.name}"

    def close(self) -> None:
        # InferenceSession has no explicit close; dropping the last reference frees its memory.
        self._io = None
        self._outputs = {}
        self._session = None


def _spec(arg) -> TensorSpec:  # noqa: ANN001 - onnxruntime.NodeArg
    # onnxruntime reports symbolic dims as strings ("batch") or None: both are dynamic.
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(arg.type)
    if dtype is None:
        raise ArtifactMismatchError(f"tensor {arg.name} has type {arg.type}; quantpipe stages use float32")
    return TensorSpec(name=arg.name, shape=shape, dtype=np.dtype(dtype))

