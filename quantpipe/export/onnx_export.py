"""Export one stage module to an ONNX graph with a dynamic batch axis and stable tensor names.

Exporter choice: torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, the default since
torch 2.9), not the legacy TorchScript tracer. On timm ViTs the tracer warns that it records Python
values of tensors as constants ("the trace might be incorrect"), emits about twice as many nodes
(shape arithmetic for every reshape) and is deprecated for removal. The dynamo exporter captures the
graph with ``torch.export``, where the batch axis is a symbolic ``Dim`` that is checked rather than
guessed, and it runs onnxscript's optimizer, giving a clean graph whose batch axis is ``"batch"``.
The example batch is 2, not 1: ``torch.export`` specialises a dimension of size 1 into a constant.

Graphs whose weights exceed protobuf's 2 GB limit are saved with ONNX external data (``<file>.data``
next to the graph), as Polygraphy's ``SaveOnnx`` does; smaller ones stay self-contained.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from quantpipe.errors import QuantpipeError

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "EXTERNAL_DATA_THRESHOLD", "ExportedGraph", "export_stage", "graph_io"]

log = logging.getLogger(__name__)

#: default ONNX opset: the dynamo exporter's native opset, supported by onnxruntime >= 1.14 and TensorRT >= 8.6
DEFAULT_OPSET = 18
#: the exporter converts to older opsets with onnx's version converter, which fails on LayerNormalization < 17
MIN_OPSET = 17
#: protobuf refuses messages over 2 GiB; keep a margin for the graph structure itself
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20


@dataclass(frozen=True)
class ExportedGraph:
    """Where a stage graph was written and its I/O as the graph declares it (``None`` = dynamic axis)."""

    path: Path
    data_path: Path | None
    input_name: str
    input_shape: tuple[int | None, ...]
    output_name: str
    output_shape: tuple[int | None, ...]
    opset: int


def _initializer_bytes(program: torch.onnx.ONNXProgram) -> int:
    # Stage modules reference the whole model, but the exported graph keeps only the weights its forward
    # uses: measure those, so each stage decides on external data by its own size.
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)


def graph_io(model: onnx.ModelProto) -> list[tuple[str, tuple[int | None, ...]]]:
    """``[(name, shape)]`` of the graph's inputs then outputs; symbolic or unknown dims are ``None``."""
    result = []
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        result.append((value.name, tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)))
    return result


def export_stage(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | Path,
    input_name: str,
    output_name: str,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> ExportedGraph:
    """Export ``module`` to ``path`` with a dynamic batch axis.

    Args:
        module: a stage in eval mode (see :mod:`quantpipe.export.split`).
        example: an input of the stage's shape; its batch size must be at least 2.
        path: the ``.onnx`` file to write (replaced if it exists, with its external data).
        input_name / output_name: the graph's tensor names (``input``, ``boundary{k}``, ``logits``).
        opset: ONNX opset to pin (>= :data:`MIN_OPSET`).
        external_data_threshold: weight bytes above which the weights go to ``<file>.data``.

    Returns:
        What was written, with the I/O shapes read back from the saved graph.

    Raises:
        QuantpipeError: the opset is too old, or the exporter failed (with its reason).
    """
    if opset < MIN_OPSET:
        raise QuantpipeError(f"--opset {opset} is too old: ViT stages need LayerNormalization, opset >= {MIN_OPSET}")
    if example.shape[0] < 2:
        raise ValueError("the example batch must have at least 2 samples so the batch axis stays symbolic")
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    for stale in (path, data_path):
        stale.unlink(missing_ok=True)
    batch = torch.export.Dim("batch", min=1)
    captured = io.StringIO()
    try:
        # The exporter prints its phases to stdout and warns about internals users cannot act on; keep them
        # out of the progress output but in the debug log.
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                None,
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - exporter failures have many types; report the cause
        log.debug("exporter output:\n%s", captured.getvalue())
        raise QuantpipeError(
            f"torch.onnx.export failed for {path.name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Check that the model is a supported timm ViT; rerun with -v for the exporter's log"
        ) from exc
    log.debug("exporter output:\n%s", captured.getvalue())
    use_external = _initializer_bytes(program) > external_data_threshold
    program.save(str(path), external_data=use_external)
    if use_external and not data_path.is_file():
        raise QuantpipeError(f"the exporter did not write external data {data_path} for {path}")
    model = onnx.load(str(path), load_external_data=False)
    actual_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if actual_opset != opset:
        raise QuantpipeError(f"{path.name} was written with opset {actual_opset}, not the requested {opset}")
    io_pairs = graph_io(model)
    if len(io_pairs) != 2 or io_pairs[0][0] != input_name or io_pairs[1][0] != output_name:
        raise QuantpipeError(f"{path.name} has I/O {[n for n, _ in io_pairs]}, expected [{input_name}, {output_name}]")
    (name_in, shape_in), (name_out, shape_out) = io_pairs
    if shape_in[0] is not None or shape_out[0] is not None:
        raise QuantpipeError(f"{path.name} lost its dynamic batch axis ({shape_in} -> {shape_out})")
    return ExportedGraph(
        path=path,
        data_path=data_path if use_external else None,
        input_name=name_in,
        input_shape=shape_in,
        output_name=name_out,
        output_shape=shape_out,
        opset=opset,
    )
