"""The stage chain on one machine: every stage engine of an export, and boundary quantization done
exactly as the stage daemons do it (one wire frame encoded and decoded per boundary crossing).

Calibration runs the chain in fp32 to observe the boundary tensors; evaluation runs it again with a
clip table, so that the accuracy it reports is the accuracy of the deployed pipeline: same codec, same
table lookups, same rotation, same frame validation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe import wire
from quantpipe.calib.data import Preprocess
from quantpipe.errors import ArtifactMismatchError

__all__ = ["StageChain", "quantize_boundary", "add_engine_arguments"]

log = logging.getLogger(__name__)


def add_engine_arguments(parser: Any) -> None:
    """The engine flags shared by ``calibrate`` and ``evaluate``."""
    group = parser.add_argument_group("engines")
    group.add_argument("--engine", default="onnxruntime", choices=("onnxruntime", "tensorrt", "auto"),
                       help="backend that runs the stage graphs (default: onnxruntime)")
    group.add_argument("--threads", type=int, default=2,
                       help="onnxruntime intra-op threads per stage (default: 2)")
    group.add_argument("--batch-size", type=int, default=32, help="images per engine call (default: 32)")
    group.add_argument("--workers", type=int, default=2, help="image decoding threads (default: 2)")


class StageChain:
    """All stages of an export directory, loaded as engines, run in order on one machine."""

    def __init__(self, stages_dir: str | Path, *, backend: str = "onnxruntime", threads: int | None = 2,
                 verify: bool = True):
        """Load the manifest (checking every stage file's sha256 unless ``verify`` is False) and engines."""
        from quantpipe.engines import load_engine
        from quantpipe.manifest import load_manifest

        self.manifest = load_manifest(stages_dir, verify=verify)
        self.preprocess = Preprocess.from_config(self.manifest.data_config)
        kwargs: dict[str, Any] = {"threads": threads} if backend in ("onnxruntime", "auto") else {}
        self.engines = [load_engine(self.manifest.stage_path(i), backend=backend, **kwargs)
                        for i in range(self.manifest.num_stages)]
        for i, engine in enumerate(self.engines):
            log.info("stage %d: %s", i, engine.describe())

    @property
    def num_stages(self) -> int:
        return len(self.engines)

    @property
    def num_boundaries(self) -> int:
        return len(self.engines) - 1

    def boundary_channels(self, boundary: int) -> int:
        """Size of the last axis of boundary ``boundary`` (the hidden dimension)."""
        shape = self.manifest.boundaries[boundary].shape
        if not shape or shape[-1] is None:
            raise ArtifactMismatchError(f"boundary {boundary} has no static last dimension ({shape}); re-export")
        return int(shape[-1])

    def run_stage(self, index: int, x: np.ndarray) -> np.ndarray:
        """Run stage ``index`` on a batch (float32)."""
        return np.asarray(self.engines[index].run(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)

    def run(self, images: np.ndarray, quantize=None) -> np.ndarray:
        """The whole chain; ``quantize(boundary, x) -> x_hat`` is applied at every boundary if given."""
        x = images
        for i in range(self.num_stages):
            if i > 0 and quantize is not None:
                x = quantize(i - 1, x)
            x = self.run_stage(i, x)
        return x

    def close(self) -> None:
        for engine in self.engines:
            engine.close()

    def __enter__(self) -> "StageChain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quantize_boundary(x: np.ndarray, *, table: wire.RangeProvider, boundary: int, method: int, bits: int,
                      stage: int | None = None) -> np.ndarray:
    """What a boundary crossing does to ``x``: encode one wire frame with ``table`` and decode it.

    Bits 32 is the identity (the frame carries raw float32). The sending stage index defaults to the
    boundary index (stage ``b`` sends across boundary ``b``).
    """
    frames = wire.encode_frame(x, seq=0, first_id=0, stage=boundary if stage is None else stage, bits=bits,
                               table=table if bits != 32 else None, boundary=boundary, method=method)
    _, y = wire.decode_frame(frames, table=table)
    return y
