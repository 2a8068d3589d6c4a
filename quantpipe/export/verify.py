"""Verify exported stage graphs against the whole torch model.

Three checks, all on the CPU so that they mean the same on every machine:

1. ``onnx.checker.check_model(full_check=True)`` on every graph (with shape inference).
2. Each stage alone: onnxruntime on the torch boundary tensor entering it vs the torch stage's output.
   This localises an export error to one stage.
3. The chain: onnxruntime stage 0 -> 1 -> ... -> logits vs ``model(x)``, plus top-1 agreement. The torch
   stages chained are also compared with ``model(x)``, which proves the cut itself is exact.

Errors are reported as the maximum absolute difference, that difference relative to the largest
reference magnitude, and the smallest per-sample cosine similarity. Beyond tolerance is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from quantpipe.engines import Engine, load_engine
from quantpipe.errors import QuantpipeError
from quantpipe.export.data import VerifyInputs

__all__ = [
    "Comparison",
    "VerifyReport",
    "check_graphs",
    "verify_stages",
    "compare_engine_chain",
    "DEFAULT_RTOL",
    "DEFAULT_MIN_COSINE",
]

log = logging.getLogger(__name__)

#: max |onnx - torch| / max |torch| allowed; fp32 graphs differ from torch only by operator reordering
DEFAULT_RTOL = 1e-4
#: smallest per-sample cosine similarity allowed
DEFAULT_MIN_COSINE = 0.99999


@dataclass
class Comparison:
    """Running comparison of one tensor over all verification batches."""

    name: str
    max_abs: float = 0.0
    max_ref: float = 0.0
    min_cosine: float = 1.0
    samples: int = 0

    @property
    def rel(self) -> float:
        return self.max_abs / self.max_ref if self.max_ref > 0 else self.max_abs

    def update(self, out: np.ndarray, ref: np.ndarray) -> None:
        out64 = out.reshape(out.shape[0], -1).astype(np.float64)
        ref64 = ref.reshape(ref.shape[0], -1).astype(np.float64)
        self.max_abs = max(self.max_abs, float(np.abs(out64 - ref64).max()))
        self.max_ref = max(self.max_ref, float(np.abs(ref64).max()))
        norms = np.linalg.norm(out64, axis=1) * np.linalg.norm(ref64, axis=1)
        cosine = np.where(norms > 0, (out64 * ref64).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
        self.min_cosine = min(self.min_cosine, float(cosine.min()))
        self.samples += out.shape[0]

    def passed(self, rtol: float, min_cosine: float) -> bool:
        return self.rel <= rtol and self.min_cosine >= min_cosine

    def line(self) -> str:
        return (
            f"{self.name:<28} max abs {self.max_abs:.3e}  rel {self.rel:.3e}  "
            f"min cosine {self.min_cosine:.8f}  ({self.samples} samples)"
        )


@dataclass
class VerifyReport:
    """All comparisons of one export, and the tolerance they were judged by."""

    source: str
    real_images: bool
    rtol: float
    min_cosine: float
    comparisons: list[Comparison] = field(default_factory=list)
    top1_agreement: float = 0.0
    accuracy_torch: float | None = None
    accuracy_onnx: float | None = None

    @property
    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed(self.rtol, self.min_cosine)]

    def lines(self) -> list[str]:
        out = [f"verification on {self.source} (tolerance: rel <= {self.rtol:g}, cosine >= {self.min_cosine})"]
        out += [("  FAIL " if c in self.failures else "  ok   ") + c.line() for c in self.comparisons]
        out.append(f"  top-1 agreement onnx chain vs torch: {self.top1_agreement * 100:.2f}%")
        if self.accuracy_torch is not None:
            out.append(f"  top-1 accuracy: torch {self.accuracy_torch * 100:.2f}%, onnx chain {self.accuracy_onnx * 100:.2f}%")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for c, entry in zip(self.comparisons, d["comparisons"]):
            entry["rel"] = c.rel
            entry["passed"] = c.passed(self.rtol, self.min_cosine)
        return d

    def raise_if_failed(self) -> None:
        """Raise :class:`QuantpipeError` naming each tensor that is beyond tolerance."""
        # On random inputs logits can tie to within float error, so top-1 may flip without any export
        # error (the tolerances already bound the logits); on real images a flip is a failure.
        top1_flipped = self.real_images and self.top1_agreement < 1.0
        if self.failures or top1_flipped:
            names = ", ".join(c.name for c in self.failures) or "top-1"
            raise QuantpipeError(
                f"verification failed ({names}):\n" + "\n".join(self.lines()) + "\nThe ONNX graphs do not reproduce the "
                "torch model; try another --opset, or report the model and these figures as a bug"
            )


def check_graphs(paths: Sequence[Path]) -> None:
    """Run the full ONNX checker (including shape inference) on every graph.

    Raises:
        QuantpipeError: a graph is invalid.
    """
    for path in paths:
        try:
            # The path form also handles graphs with external data over 2 GB.
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise QuantpipeError(f"onnx.checker rejected {path}: {exc}") from exc


def verify_stages(
    model: torch.nn.Module,
    stages: Sequence[torch.nn.Module],
    graph_paths: Sequence[Path],
    inputs: VerifyInputs,
    batch_size: int = 8,
    rtol: float = DEFAULT_RTOL,
    min_cosine: float = DEFAULT_MIN_COSINE,
    threads: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Compare every stage graph and their chain with the torch model (onnxruntime on the CPU).

    Args:
        model: the whole torch model, eval mode.
        stages: the torch stage modules the graphs were exported from.
        graph_paths: the stage graphs, in order.
        inputs: preprocessed images (and labels, where known).
        batch_size: samples per forward pass (bounds memory).
        rtol / min_cosine: tolerance; see :data:`DEFAULT_RTOL`, :data:`DEFAULT_MIN_COSINE`.
        threads: onnxruntime intra-op threads.
        progress: called with the number of samples done after each batch.

    Returns:
        The report; call :meth:`VerifyReport.raise_if_failed` to turn a failure into an error.
    """
    engines = [load_engine(p, backend="onnxruntime", providers=["CPUExecutionProvider"], threads=threads) for p in graph_paths]
    n = len(stages)
    report = VerifyReport(source=inputs.source, real_images=inputs.real, rtol=rtol, min_cosine=min_cosine)
    split_exact = Comparison("torch stages vs torch model")
    per_stage = [Comparison(f"stage {k} onnx vs torch") for k in range(n)]
    chain = Comparison("onnx chain vs torch model")
    agree = correct_torch = correct_onnx = labelled = 0
    images = inputs.images
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].contiguous()
            ref = model(x).numpy()
            # torch boundaries, each feeding the next torch stage and its own onnx stage
            t = x
            h = x.numpy()
            for k, (stage, engine) in enumerate(zip(stages, engines)):
                t_in = t.numpy()
                t = stage(t)
                per_stage[k].update(engine.run(t_in), t.numpy())
                h = engine.run(h)
            split_exact.update(t.numpy(), ref)
            chain.update(h, ref)
            agree += int((h.argmax(1) == ref.argmax(1)).sum())
            for label, p_ref, p_onnx in zip(inputs.labels[start : start + batch_size], ref.argmax(1), h.argmax(1)):
                if label >= 0:
                    labelled += 1
                    correct_torch += int(p_ref == label)
                    correct_onnx += int(p_onnx == label)
            log.debug("verified %d/%d", min(start + batch_size, images.shape[0]), images.shape[0])
            if progress is not None:
                progress(x.shape[0])
    for engine in engines:
        engine.close()
    report.comparisons = [split_exact, *per_stage, chain]
    report.top1_agreement = agree / images.shape[0]
    if labelled:
        report.accuracy_torch = correct_torch / labelled
        report.accuracy_onnx = correct_onnx / labelled
    return report


def compare_engine_chain(
    engines: Sequence[Engine],
    model: torch.nn.Module,
    inputs: VerifyInputs,
    batch_size: int,
    name: str,
) -> tuple[Comparison, float]:
    """Run already-loaded engines as a chain (e.g. TensorRT plans) and compare the logits with ``model``.

    Returns:
        The comparison and the top-1 agreement with torch (a fraction).
    """
    comparison = Comparison(name)
    agree = 0
    images = inputs.images
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].contiguous()
            h = x.numpy()
            for engine in engines:
                h = engine.run(h)
            ref = model(x).numpy()
            comparison.update(h, ref)
            agree += int((h.argmax(1) == ref.argmax(1)).sum())
    return comparison, agree / images.shape[0]
