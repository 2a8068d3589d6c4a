"""The stage manifest: what ``quantpipe export`` wrote and everything downstream reads.

``<export dir>/manifest.json`` describes a model cut into pipeline stages (QuantPipe, Wang et al. 2022,
cuts at transformer block boundaries so each boundary carries one ``[B, tokens, dim]`` tensor): the
model and split, one ONNX graph per stage with its sha256, the stages' input/output names and shapes,
the boundary tensor shapes, timm's preprocessing (data config) and the versions of the tools that made
it. :func:`load_manifest` refuses a manifest of another format or version, and stage files that are
missing or were modified, with a message saying how to regenerate them.

This module uses only the standard library: stage daemons on devices read it without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantpipe.errors import ArtifactMismatchError, QuantpipeError

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST_NAME",
    "TensorInfo",
    "StageInfo",
    "BoundaryInfo",
    "StageManifest",
    "load_manifest",
    "sha256_file",
]

FORMAT = "quantpipe.stages"
VERSION = 1
MANIFEST_NAME = "manifest.json"



def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so multi-GB graphs do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _shape(value: Any) -> tuple[int | None, ...]:
    return tuple(None if d is None else int(d) for d in value)


@dataclass(frozen=True)
class TensorInfo:
    """A stage input or output: its graph name and shape (``None`` = the dynamic batch axis)."""

    name: str
    shape: tuple[int | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorInfo:
        return cls(name=str(d["name"]), shape=_shape(d["shape"]))


@dataclass(frozen=True)
class StageInfo:
    """One stage graph: file (relative to the export dir), sha256, I/O and the blocks it holds.

    ``blocks`` is the half-open range ``[first, last)`` of transformer block indices. A graph saved with
    ONNX external data (over 2 GB) also names its data file and that file's sha256.
    """

    index: int
    file: str
    sha256: str
    input: TensorInfo
    output: TensorInfo
    blocks: tuple[int, int]
    data_file: str | None = None
    data_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index,
            "file": self.file,
            "sha256": self.sha256,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "blocks": list(self.blocks),
        }
        if self.data_file is not None:
            d["data_file"] = self.data_file
            d["data_sha256"] = self.data_sha256
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageInfo:
        return cls(
            index=int(d["index"]),
            file=str(d["file"]),
            sha256=str(d["sha256"]),
            input=TensorInfo.from_dict(d["input"]),
            output=TensorInfo.from_dict(d["output"]),
            blocks=(int(d["blocks"][0]), int(d["blocks"][1])),
            data_file=d.get("data_file"),
            data_sha256=d.get("data_sha256"),
        )


@dataclass(frozen=True)
class BoundaryInfo:
    """The tensor leaving stage ``index`` (named ``boundary{index}`` in the graphs)."""

    index: int
    shape: tuple[int | None, ...]

    @property
    def name(self) -> str:
        return f"boundary{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BoundaryInfo:
        return cls(index=int(d["index"]), shape=_shape(d["shape"]))


@dataclass
class StageManifest:
    """The parsed ``manifest.json`` of an export directory.

    Attributes:
        model: timm model name.
        split: block indices where the model is cut (``[4, 8]``).
        num_blocks: number of transformer blocks in the whole model.
        stages: one entry per stage graph, in pipeline order.
        boundaries: one entry per cut (``len(split)``), the tensor crossing it.
        data_config: timm's resolved data config (input_size, interpolation, crop_pct, crop_mode,
            mean, std); preprocessing must follow it exactly.
        num_classes: classifier width (the last stage outputs ``[B, num_classes]`` logits).
        engines: engines built for the stages, keyed by backend (see ``quantpipe export --engine``).
        versions: versions of the tools that produced the graphs.
        provenance: how it was made (weights source, opset, exporter, command line, verification).
        pixels_stage0: optional second graph of stage 0 that takes pixel values 0..255 (normalization
            folded in; ``quantpipe export --pixels-stage``): ``{"file", "sha256", "input", "verification"}``.
            A pipeline uses it by naming it as stage 0's engine; ``quantpipe serve`` then sends uint8.
        directory: where the manifest was loaded from or written to (not serialised).
    """

    model: str
    split: list[int]
    num_blocks: int
    stages: list[StageInfo]
    boundaries: list[BoundaryInfo]
    data_config: dict[str, Any]
    num_classes: int
    engines: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    pixels_stage0: dict[str, Any] | None = None
    directory: Path | None = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_path(self, index: int) -> Path:
        """Absolute path of stage ``index``'s ONNX graph."""
        if self.directory is None:
            raise QuantpipeError("this manifest has no directory; load it with load_manifest(dir)")
        return (self.directory / self.stages[index].file).resolve()

    def regenerate_hint(self) -> str:
        """The command that rebuilds this export directory, for error messages."""
        command = self.provenance.get("command")
        if command:
            return command
        out = shlex.quote(str(self.directory or "DIR"))
        return f"quantpipe export --model {self.model} --split {','.join(map(str, self.split))} --out {out}"

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "split": list(self.split),
            "num_blocks": self.num_blocks,
            "stages": [s.to_dict() for s in self.stages],
            "boundaries": [b.to_dict() for b in self.boundaries],
            "data_config": self.data_config,
            "num_classes": self.num_classes,
            "engines": self.engines,
            "versions": self.versions,
            "provenance": self.provenance,
        }
        if self.pixels_stage0 is not None:
            d["pixels_stage0"] = self.pixels_stage0
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path | None = None) -> StageManifest:
        return cls(
            model=str(d["model"]),
            split=[int(i) for i in d["split"]],
            num_blocks=int(d["num_blocks"]),
            stages=[StageInfo.from_dict(s) for s in d["stages"]],
            boundaries=[BoundaryInfo.from_dict(b) for b in d["boundaries"]],
            data_config=dict(d["data_config"]),
            num_classes=int(d["num_classes"]),
            engines=dict(d.get("engines", {})),
            versions=dict(d.get("versions", {})),
            provenance=dict(d.get("provenance", {})),
            pixels_stage0=dict(d["pixels_stage0"]) if d.get("pixels_stage0") else None,
            directory=directory,
        )

    def write(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """Write ``manifest.json`` atomically (a reader never sees half a file) and return its path."""
        target = Path(directory) if directory is not None else self.directory
        if target is None:
            raise QuantpipeError("no directory given to write the manifest to")
        target.mkdir(parents=True, exist_ok=True)
        self.directory = target
        path = target / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def verify_files(self) -> None:
        """Check every stage file (and external data file) exists and matches its recorded sha256.

        Raises:
            ArtifactMismatchError: a file is missing or its contents changed since export.
        """
        checks = []
        for stage in self.stages:
            pairs = [(stage.file, stage.sha256)]
            if stage.data_file is not None:
                pairs.append((stage.data_file, stage.data_sha256 or ""))
            checks.append((stage, pairs))
        if self.pixels_stage0 is not None:
            checks.append((self.stages[0], [(str(self.pixels_stage0["file"]), str(self.pixels_stage0["sha256"]))]))
        for stage, pairs in checks:
            for name, expected in pairs:
                path = (self.directory or Path(".")) / name
                if not path.is_file():
                    raise ArtifactMismatchError(
                        f"stage {stage.index} file {path} is missing; regenerate the export with: "
                        f"{self.regenerate_hint()}"
                    )
                actual = sha256_file(path)
                if actual != expected:
                    raise ArtifactMismatchError(
                        f"stage {stage.index} file {path} has sha256 {actual[:12]}..., the manifest records "
                        f"{expected[:12]}...: the file was modified or belongs to another export; regenerate "
                        f"it with: {self.regenerate_hint()}"
                    )


def load_manifest(directory: str | os.PathLike[str], verify: bool = True) -> StageManifest:
    """Read and validate ``<directory>/manifest.json``.

    Args:
        directory: an export directory (or the path of its ``manifest.json``).
        verify: also check that every stage file exists and matches its sha256 (reads every file).

    Returns:
        The parsed manifest, with ``directory`` set.

    Raises:
        QuantpipeError: the manifest is missing, unreadable, of another format or a newer version.
        ArtifactMismatchError: a stage file is missing or modified (only with ``verify=True``).
    """
    path = Path(directory)
    if path.name == MANIFEST_NAME and path.is_file():
        path = path.parent
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise QuantpipeError(
            f"{manifest_path} not found: {path} is not an export directory. Create one with: "
            f"quantpipe export --model NAME --split 4,8 --out {shlex.quote(str(path))}"
        )
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantpipeError(f"cannot read {manifest_path} ({exc}); regenerate it with quantpipe export") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise QuantpipeError(
            f"{manifest_path} has format {found!r}, expected {FORMAT!r}; it was not written by quantpipe export"
        )
    version = data.get("version")
    if version != VERSION:
        raise QuantpipeError(
            f"{manifest_path} is manifest version {version!r}; this quantpipe reads version {VERSION}. "
            f"Re-export with this quantpipe (quantpipe export ... --out {shlex.quote(str(path))}) or upgrade quantpipe"
        )
    try:
        manifest = StageManifest.from_dict(data, directory=path)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise QuantpipeError(
            f"{manifest_path} is malformed ({type(exc).__name__}: {exc}); regenerate it with quantpipe export"
        ) from exc
    _check_consistency(manifest, manifest_path)
    if verify:
        manifest.verify_files()
    return manifest


def _check_consistency(m: StageManifest, path: Path) -> None:
    """Structural checks that catch hand-edited manifests before a pipeline runs on them."""
    problems = []
    if len(m.stages) != len(m.split) + 1:
        problems.append(f"{len(m.stages)} stages for split {m.split}")
    if len(m.boundaries) != len(m.split):
        problems.append(f"{len(m.boundaries)} boundaries for split {m.split}")
    for i, stage in enumerate(m.stages):
        if stage.index != i:
            problems.append(f"stage {i} has index {stage.index}")
        expected_in = "input" if i == 0 else f"boundary{i - 1}"
        expected_out = "logits" if i == len(m.stages) - 1 else f"boundary{i}"
        if stage.input.name != expected_in or stage.output.name != expected_out:
            problems.append(f"stage {i} names {stage.input.name}->{stage.output.name}, expected {expected_in}->{expected_out}")
    if problems:
        raise QuantpipeError(f"{path} is inconsistent ({'; '.join(problems)}); regenerate it with quantpipe export")
