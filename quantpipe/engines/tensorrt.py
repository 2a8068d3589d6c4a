"""TensorRT backend: build a serialized engine per stage graph, cache it, and run it.

Building: the stage's ONNX graph is parsed into an explicit-batch network with one optimization profile
over the batch range ``(min, opt, max)``, optionally in fp16, with a persistent timing cache (merged under
a file lock, so parallel builds share tactics). Each ``.plan`` gets an engine manifest (JSON) holding
what makes a plan valid: TensorRT version, GPU name and compute capability, precision, profile and the
ONNX graph's sha256. That tuple is the cache key: when any part differs the plan is rebuilt, because a
plan deserialised by another TensorRT version or GPU either fails or silently runs a wrong graph.

Running uses the named-tensor API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``),
the only one in TensorRT 10+ (the binding-index API was removed) and already present in 8.6.
API differences handled here, by TensorRT major version:

* 8.6: networks need ``1 << EXPLICIT_BATCH``; fp16 is the ``BuilderFlag.FP16`` builder flag.
* 10.x: explicit batch is the only mode (the flag is deprecated and ignored, so it is not set).
* 11.x: weak typing is gone: no ``BuilderFlag.FP16``; every network is strongly typed, so precision comes
  from the graph. An fp16 engine needs an fp16 ONNX graph (``quantpipe export --fp16`` writes one).

tensorrt and polygraphy (for CUDA memory and streams, through the CUDA runtime via ctypes) are imported
only when an engine is built or loaded: this module imports without them.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.engines.base import Engine, TensorSpec, check_input
from quantpipe.errors import ArtifactMismatchError, MissingDependencyError, QuantpipeError
from quantpipe.manifest import sha256_file

__all__ = [
    "TensorRTEngine",
    "build_engine",
    "engine_for_onnx",
    "build_stage_engines",
    "engine_key",
    "gpu_info",
    "needs_fp16_graph",
    "max_onnx_opset",
    "ENGINE_FORMAT",
]

log = logging.getLogger(__name__)

ENGINE_FORMAT = "quantpipe.trt_engine"
_ENGINE_VERSION = 1
_INSTALL_HINT = (
    "pip install 'quantpipe[tensorrt]' (tensorrt>=8.6 and polygraphy) on a machine with an NVIDIA GPU and driver"
)


def _import_trt():  # noqa: ANN202 - returns the tensorrt module
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"the TensorRT backend needs TensorRT's Python package: {_INSTALL_HINT}") from exc
    return tensorrt


def _cuda():  # noqa: ANN202 - polygraphy's CUDA runtime wrapper
    try:
        from polygraphy import cuda
    except ImportError as exc:
        raise MissingDependencyError(f"the TensorRT backend uses polygraphy for CUDA memory: {_INSTALL_HINT}") from exc
    return cuda


def _major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def needs_fp16_graph() -> bool:
    """Whether this TensorRT builds fp16 only from fp16 graphs (strong typing, no fp16 builder flag: 11+)."""
    return not hasattr(_import_trt().BuilderFlag, "FP16")


def max_onnx_opset() -> int | None:
    """The newest ONNX opset this TensorRT's parser reads, where it is older than export's default.

    TensorRT 8.6's ONNX parser stops at opset 17 (onnx-tensorrt's operator matrix), which JetPack 6 on
    Jetson Orin still ships; TensorRT 10+ reads the opsets quantpipe exports. ``None`` = no known limit.
    """
    return 17 if _major(_import_trt()) < 10 else None


def _logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to Python logging (so -v/-q apply to TensorRT too)."""

    class _Forward(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            severities = trt.ILogger.Severity
            level = {
                severities.INTERNAL_ERROR: logging.CRITICAL,
                severities.ERROR: logging.ERROR,
                severities.WARNING: logging.WARNING,
                severities.INFO: logging.DEBUG,  # TensorRT's INFO is build detail
            }.get(severity, logging.DEBUG)
            log.log(level, "TensorRT: %s", msg)

    return _Forward()


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability of a CUDA device, from the CUDA driver API (``libcuda``).

    The driver API is used because its calls are plain ints and strings; the runtime's
    ``cudaDeviceProp`` struct changes layout between CUDA versions.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise QuantpipeError(f"the NVIDIA driver (libcuda.so.1) is not loadable ({exc}); TensorRT needs a GPU") from exc
    handle = ctypes.c_int()
    major, minor = ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    for status in (
        lib.cuInit(0),
        lib.cuDeviceGet(ctypes.byref(handle), device),
        lib.cuDeviceGetName(name, len(name), handle),
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, handle),
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle),
    ):
        if status != 0:
            raise QuantpipeError(f"CUDA driver call failed with error {status}; is a GPU visible (CUDA_VISIBLE_DEVICES)?")
    return {"gpu": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def engine_key(onnx_sha256: str, batch: Sequence[int], fp16: bool, trt_version: str, gpu: dict[str, str]) -> dict[str, Any]:
    """Everything a plan depends on; a cached plan is reused only when this matches exactly."""
    return {
        "tensorrt": trt_version,
        "gpu": gpu["gpu"],
        "compute_capability": gpu["compute_capability"],
        "precision": "fp16" if fp16 else "fp32",
        "profile": {"min": int(batch[0]), "opt": int(batch[1]), "max": int(batch[2])},
        "onnx_sha256": onnx_sha256,
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _network_is_fp16(network: Any, trt: Any) -> bool:
    """Whether a parsed (strongly typed) network computes in fp16, i.e. came from an fp16 graph."""
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                return True
    return False


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    batch: Sequence[int] = (1, 8, 32),
    fp16: bool = False,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_bytes: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the TensorRT engine of one stage graph.

    Args:
        onnx_path: the stage graph (external data next to it is found by path).
        plan_path: where the serialized engine goes; its engine manifest is ``<plan>.json``.
        batch: ``(min, opt, max)`` batch sizes of the optimization profile.
        fp16: reduced precision. TensorRT < 11: the fp16 builder flag on the fp32 graph; TensorRT >= 11:
            ``onnx_path`` must be an fp16 graph (strong typing), else this raises.
        timing_cache: a timing cache file shared by builds (read, merged and written under a lock).
        workspace_bytes: cap on TensorRT's build workspace (default: TensorRT's, the GPU's memory).
        force: rebuild even if a cached plan matches.

    Returns:
        The engine manifest (also written to ``<plan>.json``).

    Raises:
        MissingDependencyError: TensorRT is not installed.
        QuantpipeError: parsing or building failed, or fp16 was asked of an fp32 graph on TensorRT >= 11.
    """
    trt = _import_trt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise ArtifactMismatchError(f"stage graph {onnx_path} not found; run quantpipe export first")
    key = engine_key(sha256_file(onnx_path), batch, fp16, trt.__version__, gpu_info())
    meta_path = plan_path.with_name(plan_path.name + ".json")
    if not force and plan_path.is_file() and meta_path.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            cached = json.loads(meta_path.read_text())
            if cached.get("key") == key and cached.get("plan_sha256") == sha256_file(plan_path):
                log.info("%s: cached engine matches (%s), not rebuilding", plan_path.name, key["precision"])
                return cached
        log.info("%s: cached engine is stale or unverifiable, rebuilding", plan_path.name)

    started = time.perf_counter()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if _major(trt) < 10:
        # 8.x defaults to implicit batch; our graphs have an explicit dynamic batch axis.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = (
        parser.parse_from_file(str(onnx_path))
        if hasattr(parser, "parse_from_file")
        else parser.parse(onnx_path.read_bytes(), str(onnx_path))
    )
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        limit = max_onnx_opset()
        hint = f"TensorRT {trt.__version__} reads ONNX opsets up to {limit}: re-export with --opset {limit}" if limit else (
            "try another --opset")
        raise QuantpipeError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}. {hint}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise ArtifactMismatchError(f"{onnx_path} is not a quantpipe stage (one input, one output)")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not fp16 and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default and rounds matmul inputs to 10 mantissa bits; "fp32" should mean fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        if hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        elif not _network_is_fp16(network, trt):
            raise QuantpipeError(
                f"TensorRT {trt.__version__} builds strongly typed networks only (no fp16 builder flag), and {onnx_path.name} "
                "is float32. Build from the fp16 graph that 'quantpipe export --engine tensorrt --fp16' writes"
            )
    tensor = network.get_input(0)
    rest = tuple(tensor.shape)[1:]
    if any(d < 0 for d in rest):
        raise ArtifactMismatchError(f"{onnx_path}: only the batch axis may be dynamic, got {tuple(tensor.shape)}")
    profile = builder.create_optimization_profile()
    lo, opt, hi = (int(b) for b in batch)
    profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QuantpipeError(
            f"TensorRT {trt.__version__} failed to build {onnx_path.name} (batch {lo}:{opt}:{hi}); rerun with -v for "
            "TensorRT's log, or lower the maximum batch (--batch)"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(plan_path, bytes(serialized))
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    meta = {
        "format": ENGINE_FORMAT,
        "version": _ENGINE_VERSION,
        "key": key,
        "onnx": onnx_path.name,
        "plan_sha256": sha256_file(plan_path),
        "input": {"name": tensor.name, "shape": [None, *rest]},
        "output": {"name": network.get_output(0).name, "shape": [None, *tuple(network.get_output(0).shape)[1:]]},
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    _write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    log.info("%s: built %s engine in %.1f s", plan_path.name, key["precision"], meta["build_seconds"])
    return meta


def _save_timing_cache(config: Any, path: Path) -> None:
    """Merge this build's tactics into the cache file; concurrent builders serialise on a lock file."""
    with _locked(path):
        ours = config.get_timing_cache()
        if path.is_file():
            merged = config.create_timing_cache(path.read_bytes())
            merged.combine(ours, False)
            ours = merged
        _write_atomic(path, bytes(ours.serialize()))


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine of one stage, run with the named-tensor API on a private stream.

    Args:
        plan_path: a ``.plan`` written by :func:`build_engine`.
    """

    backend = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike[str]) -> None:
        trt = _import_trt()
        self._cuda = _cuda()
        self.path = Path(plan_path)
        if not self.path.is_file():
            raise ArtifactMismatchError(f"TensorRT engine {self.path} not found; build it with quantpipe export --engine tensorrt")
        self._runtime = trt.Runtime(_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ArtifactMismatchError(
                f"TensorRT {trt.__version__} cannot load {self.path}: it was built by another TensorRT version or for "
                "another GPU. Rebuild it (quantpipe export --engine tensorrt, or delete the .plan)"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactMismatchError(f"{self.path} has {len(inputs)} inputs, {len(outputs)} outputs; expected one each")
        self._input = self._spec(trt, inputs[0])
        self._output = self._spec(trt, outputs[0])
        lo, _, hi = self._engine.get_tensor_profile_shape(inputs[0], 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        meta_path = self.path.with_name(self.path.name + ".json")
        self.precision = json.loads(meta_path.read_text())["key"]["precision"] if meta_path.is_file() else "unknown"
        self._stream = self._cuda.Stream()
        self._buffers: dict[str, list[int]] = {inputs[0]: [0, 0], outputs[0]: [0, 0]}  # name -> [ptr, nbytes]
        self.trt_version = trt.__version__

    def _spec(self, trt: Any, name: str) -> TensorSpec:
        shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
        return TensorSpec(name=name, shape=shape, dtype=np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))))

    def _device_buffer(self, name: str, nbytes: int) -> int:
        # Grow-only buffers: the pipeline runs a steady batch size, so this allocates once.
        entry = self._buffers[name]
        if entry[1] < nbytes:
            wrapper = self._cuda.wrapper()
            if entry[0]:
                wrapper.free(entry[0])
            entry[0], entry[1] = wrapper.malloc(nbytes), nbytes
        return entry[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Copy ``x`` to the GPU, run the engine, copy the result back (synchronous)."""
        check_input(self._input, x)
        if not self.batch_range[0] <= x.shape[0] <= self.batch_range[1]:
            raise QuantpipeError(
                f"batch {x.shape[0]} is outside the engine's profile {self.batch_range[0]}..{self.batch_range[1]}; "
                "rebuild with a wider --batch MIN:OPT:MAX"
            )
        x = np.ascontiguousarray(x, dtype=self._input.dtype)
        cuda, ctx, stream = self._cuda, self._context, self._stream
        if not ctx.set_input_shape(self._input.name, x.shape):
            raise QuantpipeError(f"TensorRT refused input shape {x.shape} for {self._input.name}")
        out_shape = tuple(ctx.get_tensor_shape(self._output.name))
        out = np.empty(out_shape, dtype=self._output.dtype)
        d_in = self._device_buffer(self._input.name, x.nbytes)
        d_out = self._device_buffer(self._output.name, out.nbytes)
        wrapper = cuda.wrapper()
        wrapper.memcpy(d_in, x.ctypes.data, x.nbytes, cuda.MemcpyKind.HostToDevice, stream.ptr)
        ctx.set_tensor_address(self._input.name, d_in)
        ctx.set_tensor_address(self._output.name, d_out)
        if not ctx.execute_async_v3(stream.ptr):
            raise QuantpipeError(f"TensorRT failed to run {self.path.name}; rerun with -v for TensorRT's log")
        wrapper.memcpy(out.ctypes.data, d_out, out.nbytes, cuda.MemcpyKind.DeviceToHost, stream.ptr)
        stream.synchronize()
        return out

    def describe(self) -> str:
        return f"tensorrt {self.trt_version} {self.precision} batch {self.batch_range[0]}..{self.batch_range[1]} {self.path.name}"

    def close(self) -> None:
        if getattr(self, "_buffers", None):
            wrapper = self._cuda.wrapper()
            for ptr, _ in self._buffers.values():
                if ptr:
                    wrapper.free(ptr)
            self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            self._stream.free()
            self._stream = None
        self._context = None
        self._engine = None


def engine_for_onnx(
    onnx_path: str | os.PathLike[str],
    batch: Sequence[int] = (1, 8, 32),
    fp16: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
) -> TensorRTEngine:
    """Build the stage's engine if no matching cached one exists, then load it.

    Plans go to ``cache_dir`` (default ``<graph dir>/engines``) as ``<stem>.<precision>.plan``.
    """
    onnx_path = Path(onnx_path)
    directory = Path(cache_dir) if cache_dir is not None else onnx_path.parent / "engines"
    plan = directory / f"{onnx_path.stem}.{'fp16' if fp16 else 'fp32'}.plan"
    build_engine(onnx_path, plan, batch=batch, fp16=fp16,
                 timing_cache=timing_cache if timing_cache is not None else directory / "timing.cache")
    return TensorRTEngine(plan)


def build_stage_engines(
    onnx_paths: Sequence[Path],
    engine_dir: Path,
    batch: Sequence[int],
    fp16: bool,
    progress: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Build every stage's engine into ``engine_dir`` and return the stage manifest's ``engines.tensorrt`` entry.

    Paths in the entry are relative to the export directory (the parent of ``engine_dir``).
    """
    trt = _import_trt()
    root = engine_dir.parent
    cache = engine_dir / "timing.cache"
    stages = []
    for onnx_path in onnx_paths:
        plan = engine_dir / f"{onnx_path.stem}.{'fp16' if fp16 else 'fp32'}.plan"
        meta = build_engine(onnx_path, plan, batch=batch, fp16=fp16, timing_cache=cache)
        stages.append({"plan": str(plan.relative_to(root)), "manifest": str(plan.relative_to(root)) + ".json",
                       "onnx": str(Path(onnx_path).resolve().relative_to(root.resolve())),
                       "onnx_sha256": meta["key"]["onnx_sha256"], "plan_sha256": meta["plan_sha256"]})
        if progress is not None:
            progress()
    key = meta["key"]
    return {"tensorrt": trt.__version__, "gpu": key["gpu"], "compute_capability": key["compute_capability"],
            "precision": key["precision"], "profile": key["profile"], "timing_cache": str(cache.relative_to(root)),
            "stages": stages}
