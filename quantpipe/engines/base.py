"""The engine interface: load one stage graph, run a batch, report its input/output specs.

Backends (:mod:`quantpipe.engines.onnxruntime`, :mod:`quantpipe.engines.tensorrt`) implement
:class:`Engine`; :func:`quantpipe.engines.load_engine` picks one. A stage has exactly one input and one
output (the boundary tensors), float32, with a dynamic batch axis.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from quantpipe.errors import ArtifactMismatchError

__all__ = ["TensorSpec", "Engine", "check_input"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of an engine input or output; ``None`` marks a dynamic axis (the batch)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype = np.dtype(np.float32)


class Engine(abc.ABC):
    """One stage's compiled graph."""

    #: short backend name, e.g. ``"onnxruntime"`` or ``"tensorrt"``
    backend: str = ""
    #: set by each backend's constructor from the loaded graph
    _input: TensorSpec
    _output: TensorSpec

    @property
    def input(self) -> TensorSpec:
        """The tensor the stage takes: the image batch (stage 0) or the previous boundary."""
        return self._input

    @property
    def output(self) -> TensorSpec:
        """The tensor the stage produces: its boundary, or the logits (last stage)."""
        return self._output

    @property
    def device(self) -> str:
        """Where the engine computes and keeps its tensors: ``"cpu"`` (host memory, the default) or
        ``"cuda"`` (a CUDA GPU: :meth:`run_device` takes and returns device arrays)."""
        return "cpu"

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (float32, C-contiguous, shape matching :attr:`input`) and return the output."""

    def run_device(self, x):  # noqa: ANN001, ANN201 - device arrays (CuPy) of engines on a GPU
        """Run one batch held in device memory and return the output in device memory (no host round trip).

        Only engines whose :attr:`device` is ``"cuda"`` implement it; ``x`` is a C-contiguous float32
        device array (CuPy, or anything with ``__cuda_array_interface__``).
        """
        raise NotImplementedError(f"{type(self).__name__} runs on the {self.device}: call run() with a numpy array")

    def describe(self) -> str:
        """One line for logs: backend, providers or device, precision."""
        return self.backend

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (GPU memory, sessions)."""


def check_input(spec: TensorSpec, x: np.ndarray) -> None:
    """Refuse a batch whose rank or static dimensions differ from an engine's input.

    Raises:
        ArtifactMismatchError: with both shapes in the message; such a tensor usually comes from a stage
            of another model or split.
    """
    ok = x.ndim == len(spec.shape) and all(s is None or s == d for s, d in zip(spec.shape, x.shape))
    if not ok:
        want = "[" + ", ".join("B" if s is None else str(s) for s in spec.shape) + "]"
        raise ArtifactMismatchError(
            f"input of shape {list(x.shape)} does not fit {spec.name} {want}; the tensor probably comes from a "
            "stage of another model or split, so export all stages together"
        )
