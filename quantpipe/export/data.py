"""Verification inputs: real images preprocessed exactly as timm does, or seeded random tensors.

Real images come from an ImageFolder-style directory (one sub-folder per class). When the folders are
ImageNet WordNet ids (``n01440764``) their labels are mapped to timm's ImageNet class indices so that
top-1 accuracy can be reported next to the ONNX-vs-torch agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantpipe.errors import QuantpipeError

__all__ = ["VerifyInputs", "image_inputs", "random_inputs", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


@dataclass
class VerifyInputs:
    """A batch of preprocessed inputs and, where known, their ImageNet labels (-1 = unknown)."""

    images: torch.Tensor
    labels: list[int]
    source: str
    real: bool

    @property
    def has_labels(self) -> bool:
        return any(label >= 0 for label in self.labels)


def _list_images(root: Path) -> list[tuple[Path, str]]:
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in IMAGE_SUFFIXES:
            folder = path.parent.name if path.parent != root else ""
            files.append((path, folder))
    return files


def image_inputs(root: str | Path, data_config: dict[str, Any], limit: int | None) -> VerifyInputs:
    """Load and preprocess images under ``root`` with timm's eval transform for ``data_config``.

    Args:
        root: a directory of images, one sub-folder per class.
        data_config: the model's resolved data config (see :func:`quantpipe.export.model.data_config_of`).
        limit: how many images (spread evenly over the sorted file list, so over the classes); None = all.

    Raises:
        QuantpipeError: the directory is missing or holds no images.
    """
    import timm.data
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise QuantpipeError(f"--verify-data {root} is not a directory; give an ImageFolder-style directory of images")
    files = _list_images(root)
    if not files:
        raise QuantpipeError(f"--verify-data {root} holds no images ({', '.join(IMAGE_SUFFIXES[:5])})")
    if limit is not None and limit < len(files):
        picks = np.linspace(0, len(files) - 1, num=limit).round().astype(int)
        files = [files[i] for i in picks]
    transform = timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config["crop_mode"],
        is_training=False,
    )
    wnids = {name: i for i, name in enumerate(timm.data.ImageNetInfo().label_names())}
    images, labels = [], []
    for path, folder in files:
        try:
            with Image.open(path) as img:
                images.append(transform(img.convert("RGB")))
        except OSError as exc:
            raise QuantpipeError(f"cannot read image {path} ({exc}); remove it from {root}") from exc
        labels.append(wnids.get(folder, -1))
    return VerifyInputs(images=torch.stack(images), labels=labels, source=f"{len(images)} images from {root}", real=True)


def random_inputs(input_size: tuple[int, int, int] | list[int], count: int, seed: int = 0) -> VerifyInputs:
    """``count`` standard-normal images (the scale of normalised pixels), seeded for reproducibility."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((count, *input_size), generator=generator)
    return VerifyInputs(images=images, labels=[-1] * count, source=f"{count} random inputs (seed {seed})", real=False)
