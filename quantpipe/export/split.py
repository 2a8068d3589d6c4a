"""Cut a timm ViT into pipeline stages at transformer block boundaries.

QuantPipe (Wang et al. 2022) and PipeEdge cut between blocks so that each boundary carries exactly one
``[B, tokens, dim]`` tensor, the residual stream. ``split = [4, 8]`` on a 12-block model gives

* stage 0: patch embedding, position embedding (+ class/register tokens), ``norm_pre``, blocks 0-3
* stage 1: blocks 4-7
* stage 2: blocks 8-11, final ``norm``, the pooling and the classifier head

Because ``model.blocks`` is an ``nn.Sequential``, each stage's blocks are a slice that shares the model's
modules, and running the stages in order is operation-for-operation the whole model's ``forward``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from quantpipe.errors import ConfigError

__all__ = ["parse_split", "FirstStage", "MiddleStage", "LastStage", "HalfStage", "PixelStage", "build_stages",
           "stage_io_names"]


def parse_split(split: str | Sequence[int], num_blocks: int) -> list[int]:
    """Validate the cut points.

    Args:
        split: ``"4,8"`` or ``[4, 8]``: block indices where a new stage starts.
        num_blocks: number of transformer blocks in the model.

    Returns:
        The cut points as a list of ints.

    Raises:
        ConfigError: not integers, out of range (a cut at 0 or ``num_blocks`` would leave a stage without
            blocks), unsorted, duplicated, or empty.
    """
    if isinstance(split, str):
        parts = [p.strip() for p in split.split(",")]
        if not split.strip() or any(not p for p in parts):
            raise ConfigError(f"--split {split!r} is empty or has an empty item; give block indices like 4,8")
        try:
            cuts = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--split {split!r} must be comma-separated block indices, like 4,8") from None
    else:
        cuts = [int(c) for c in split]
        if not cuts:
            raise ConfigError("the split is empty; give at least one block index, like 4,8")
    valid = f"1..{num_blocks - 1}" if num_blocks > 1 else "none: the model has only one block"
    for c in cuts:
        if not 0 < c < num_blocks:
            raise ConfigError(
                f"split index {c} is out of range for a model with {num_blocks} blocks (valid: {valid}); a cut at 0 "
                f"or {num_blocks} would leave a stage without transformer blocks"
            )
    if len(set(cuts)) != len(cuts):
        dup = sorted({c for c in cuts if cuts.count(c) > 1})
        raise ConfigError(f"split {cuts} repeats {dup}, which would make an empty stage; give each index once")
    if cuts != sorted(cuts):
        raise ConfigError(f"split {cuts} is not sorted; give the indices in increasing order: {sorted(cuts)}")
    return cuts


def stage_io_names(index: int, num_stages: int) -> tuple[str, str]:
    """The stable graph names of stage ``index``: ``input``/``boundary{k-1}`` in, ``boundary{k}``/``logits`` out."""
    name_in = "input" if index == 0 else f"boundary{index - 1}"
    name_out = "logits" if index == num_stages - 1 else f"boundary{index}"
    return name_in, name_out


class FirstStage(nn.Module):
    """Image ``[B, 3, H, W]`` -> embeddings -> blocks ``[0, end)`` -> ``[B, tokens, dim]``."""

    def __init__(self, model: nn.Module, end: int) -> None:
        super().__init__()
        self.vit = model  # only the embedding parameters are used; the exporter drops the rest
        self.blocks = model.blocks[:end]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)  # adds class/distillation/register tokens and the position embedding
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        return self.blocks(x)


class MiddleStage(nn.Module):
    """Blocks ``[start, end)`` on the residual stream."""

    def __init__(self, model: nn.Module, start: int, end: int) -> None:
        super().__init__()
        self.blocks = model.blocks[start:end]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class LastStage(nn.Module):
    """Blocks ``[start, num_blocks)`` -> final norm -> pooling and head -> logits ``[B, num_classes]``."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.vit = model
        self.blocks = model.blocks[start:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        x = self.vit.norm(x)
        # forward_head does the model's own pooling (class token, average, attention pool, or the
        # distilled average of two heads), so every ViT variant keeps its exact head.
        return self.vit.forward_head(x)


class HalfStage(nn.Module):
    """A stage computing in fp16 with float32 input and output, for strongly typed TensorRT (>= 11).

    TensorRT 11 removed the fp16 builder flag: precision must be in the graph. Casting at the stage's
    edges keeps the boundary tensors float32, so the wire format and the other stages do not change.
    """

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = copy.deepcopy(stage).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x.half()).float()


class PixelStage(nn.Module):
    """Stage 0 taking pixel values 0..255 (float32 ``[B, 3, H, W]``): ``(x / 255 - mean) / std`` first.

    The same float32 operations in the same order as calibration's preprocessing
    (:class:`quantpipe.calib.data.Preprocess`), so on the same crop the boundary is bit-identical, and
    the link to stage 0 can carry the uint8 pixels (an 8-bit frame whose codes are the pixel values)
    instead of float32: a quarter of the bytes.
    """

    def __init__(self, stage: nn.Module, mean, std) -> None:
        super().__init__()
        self.stage = stage
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage((x / 255.0 - self.mean) / self.std)


def build_stages(model: nn.Module, cuts: Sequence[int]) -> list[nn.Module]:
    """The stage modules for ``cuts`` (validated with :func:`parse_split`), in eval mode.

    Returns:
        ``len(cuts) + 1`` modules; chaining them equals ``model(x)``.
    """
    cuts = parse_split(list(cuts), len(model.blocks))
    bounds = [0, *cuts, len(model.blocks)]
    stages: list[nn.Module] = [FirstStage(model, bounds[1])]
    for start, end in zip(bounds[1:-2], bounds[2:-1]):
        stages.append(MiddleStage(model, start, end))
    stages.append(LastStage(model, bounds[-2]))
    return [s.eval() for s in stages]
