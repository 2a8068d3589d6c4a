"""Datasets and timm's eval preprocessing, without torch: what calibration and evaluation feed stage 0.

Datasets (:func:`open_dataset`):

* ``imagenet``: either the ImageFolder layout (``<wnid>/<image>``; folders may be any subset of the
  1000 ImageNet-1k wnids) or a flat folder of ILSVRC validation images with its ground truth (see
  :func:`read_ground_truth`). The class index of a wnid is its position in the sorted list of the 1000
  wnids, shipped as ``quantpipe/calib/imagenet_synsets.txt`` (the list timm uses).
* ``folder``: any images under a directory, unlabelled.
* ``synthetic``: deterministic random images with labels, for tests.

Selection is deterministic so that calibration and evaluation never share an image: images of each
class are sorted by file name, ``offset``/``per_class`` take images ``[offset, offset + per_class)``
of every class, and the result is ordered rank by rank (first image of every class, then the second,
...), so that ``num_images`` keeps the classes balanced.

Preprocessing (:class:`Preprocess`) follows the manifest's ``data_config`` exactly as timm's
``transforms_imagenet_eval`` does for PIL images (resize the shorter edge to
``floor(size / crop_pct)`` with PIL's filter, center crop with torchvision's rounding, /255,
normalize); a test compares it with timm's transform.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import ConfigError, QuantpipeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DATASETS",
    "Preprocess",
    "Sample",
    "Dataset",
    "Batch",
    "imagenet_wnids",
    "read_ground_truth",
    "open_dataset",
    "iter_batches",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
DATASETS = ("imagenet", "folder", "synthetic")
_WNID = re.compile(r"^n\d{8}$")
_GROUND_TRUTH_NAMES = ("LOC_val_solution.csv", "val.txt", "val_labels.txt", "ground_truth.txt")


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in sorted order (index = class index of timm's ImageNet models)."""
    text = resources.files("quantpipe.calib").joinpath("imagenet_synsets.txt").read_text()
    wnids = [w.strip() for w in text.split() if w.strip()]
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise QuantpipeError("quantpipe/calib/imagenet_synsets.txt is damaged; reinstall quantpipe")
    return wnids


# ---------------------------------------------------------------------------------------------- preprocessing
_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform (``transforms_imagenet_eval``) for one model, in PIL + numpy.

    Attributes mirror timm's data config: ``input_size`` (C, H, W), ``interpolation``, ``crop_pct``,
    ``crop_mode`` ("center" or "squash"), ``mean``, ``std``.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ConfigError(f"unsupported interpolation {self.interpolation!r} (use one of {', '.join(_PIL_FILTERS)})")
        if self.crop_mode not in ("center", "squash"):
            raise ConfigError(f"crop_mode {self.crop_mode!r} is not supported by quantpipe's preprocessing "
                              "(supported: center, squash); re-export with a model whose data config uses one")
        if self.input_size[0] != 3 or len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"expected 3-channel RGB input, got input_size {self.input_size}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Preprocess":
        """From a manifest's ``data_config`` (missing keys take timm's defaults)."""
        return cls(
            input_size=tuple(int(v) for v in config.get("input_size", (3, 224, 224))),
            interpolation=str(config.get("interpolation", "bicubic")),
            crop_pct=float(config.get("crop_pct") or 0.875),  # timm: crop_pct None -> DEFAULT_CROP_PCT
            crop_mode=str(config.get("crop_mode") or "center"),
            mean=tuple(float(v) for v in config.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in config.get("std", (0.229, 0.224, 0.225))),
        )

    def __call__(self, image: Any) -> np.ndarray:
        """A PIL image -> float32 ``[3, H, W]``, normalized."""
        return self.normalize(self.pixels(image))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[..., 3, H, W]`` pixels -> float32 ``(p / 255 - mean) / std``, per channel.

        A 256-entry table per channel, computed with the same float32 operations in the same order as
        the elementwise form, so the result is bit-identical to it at a fraction of its cost."""
        lut = self._lut
        out = np.empty(pixels.shape, np.float32)
        for c in range(pixels.shape[-3]):
            np.take(lut[c], pixels[..., c, :, :], out=out[..., c, :, :])
        return out

    @functools.cached_property
    def _lut(self) -> np.ndarray:  # [3, 256]; cached_property writes __dict__, so it works on a frozen dataclass
        p = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return np.ascontiguousarray((p[None, :] - mean) / std, dtype=np.float32)

    def pixels(self, image: Any) -> np.ndarray:
        """A PIL image -> uint8 ``[3, H, W]``: resized and cropped as timm's eval transform, not normalized."""
        from PIL import Image

        img = image.convert("RGB") if image.mode != "RGB" else image
        _, th, tw = self.input_size
        sh, sw = math.floor(th / self.crop_pct), math.floor(tw / self.crop_pct)
        resample = Image.Resampling(_PIL_FILTERS[self.interpolation])
        w, h = img.size
        if self.crop_mode == "squash":
            size = (sw, sh)
        elif sh == sw:
            # torchvision Resize(int): shorter edge to the size, longer edge truncated (int()), aspect kept
            short, long_ = (w, h) if w <= h else (h, w)
            new_short, new_long = sh, int(sh * long_ / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            # timm's ResizeKeepRatio for non-square targets: scale so both edges cover the target
            ratio = max(sh / h, sw / w)  # shorter edge relative to its target decides
            size = (round(w * ratio), round(h * ratio))
        if size != img.size:
            img = img.resize(size, resample)
        img = _center_crop(img, th, tw)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))

    def load(self, path: str | Path) -> np.ndarray:
        """Open, decode and preprocess one image file (raises OSError/ValueError if unreadable)."""
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return self(im)


def _center_crop(img: Any, th: int, tw: int) -> Any:
    """torchvision's CenterCrop: pad with zeros if smaller, then crop at round((size - crop) / 2)."""
    from PIL import Image

    w, h = img.size
    if w < tw or h < th:
        canvas = Image.new("RGB", (max(w, tw), max(h, th)))
        canvas.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


# ---------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class Sample:
    """One image: a file (``path``) or a synthetic seed, and its class index (-1: unlabelled)."""

    path: str
    label: int = -1


@dataclass
class Dataset:
    """A selected, ordered list of samples plus what was left out and why."""

    kind: str
    root: str
    samples: list[Sample]
    description: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    synthetic_shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labelled(self) -> bool:
        return bool(self.samples) and all(s.label >= 0 for s in self.samples)


def read_ground_truth(path: str | Path, wnids: Sequence[str]) -> dict[str, int]:
    """Labels of flat ILSVRC validation images: ``{file stem: class index}``.

    Accepted forms: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first token
    is the wnid), or a text file of ``<file name> <label>`` lines where the label is a wnid or a class
    index in sorted-wnid order (e.g. the ``val.txt`` of Caffe/timm-style tooling). The devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` uses another class order and is refused with advice.
    """
    path = Path(path)
    index = {w: i for i, w in enumerate(wnids)}
    labels: dict[str, int] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantpipeError(f"cannot read ground-truth file {path}: {exc}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.DictReader(lines):
            key = next(k for k in row if k.strip().lower() == "imageid")
            pred = next(k for k in row if k.strip().lower() == "predictionstring")
            wnid = (row[pred] or "").split()[0] if row[pred] else ""
            if wnid not in index:
                raise QuantpipeError(f"{path}: unknown wnid {wnid!r} for image {row[key]}")
            labels[Path(row[key].strip()).stem] = index[wnid]
        return labels
    if lines and all(len(ln.split()) == 1 and ln.strip().isdigit() for ln in lines[:5]):
        raise QuantpipeError(
            f"{path} looks like the devkit's ILSVRC2012_validation_ground_truth.txt, whose ILSVRC2012_IDs are not "
            "timm's class indices. Provide LOC_val_solution.csv (ImageId,PredictionString) or a '<file> <wnid>' "
            "list, or sort the images into <wnid>/ folders and use the ImageFolder layout")
    for n, ln in enumerate(lines, 1):
        parts = ln.replace(",", " ").split()
        if len(parts) < 2:
            raise QuantpipeError(f"{path}:{n}: expected '<file name> <label>', got {ln!r}")
        name, lab = parts[0], parts[1]
        if lab in index:
            labels[Path(name).stem] = index[lab]
        elif lab.isdigit() and int(lab) < len(wnids):
            labels[Path(name).stem] = int(lab)
        else:
            raise QuantpipeError(f"{path}:{n}: label {lab!r} is neither a wnid nor a class index < {len(wnids)}")
    return labels


def _list_images(folder: Path, skipped: list[tuple[str, str]], recursive: bool) -> list[Path]:
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    images = []
    for p in files:
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        elif not p.name.startswith(".") and p.name not in _GROUND_TRUTH_NAMES:
            skipped.append((str(p), "not an image file (extension)"))
    return images


def _select(groups: Mapping[int, list[Sample]], offset: int, per_class: int | None, num_images: int | None) -> list[Sample]:
    """Images [offset, offset+per_class) of every group, interleaved rank by rank, then the first num_images."""
    picked = {k: v[offset: None if per_class is None else offset + per_class] for k, v in sorted(groups.items())}
    out: list[Sample] = []
    rank = 0
    while any(rank < len(v) for v in picked.values()):
        out.extend(v[rank] for v in picked.values() if rank < len(v))
        rank += 1
    return out[:num_images] if num_images is not None else out


def open_dataset(
    kind: str,
    data_dir: str | Path | None = None,
    *,
    offset: int = 0,
    per_class: int | None = None,
    num_images: int | None = None,
    ground_truth: str | Path | None = None,
    synthetic_size: tuple[int, int] = (256, 320),
    synthetic_classes: int = 1000,
) -> Dataset:
    """Find and select the images of a dataset (see the module docstring). Nothing is decoded here.

    Raises:
        ConfigError / QuantpipeError: unknown kind, missing folder, no labels, nothing selected.
    """
    if kind not in DATASETS:
        raise ConfigError(f"unknown dataset {kind!r}: choose one of {', '.join(DATASETS)}")
    if offset < 0 or (per_class is not None and per_class < 1) or (num_images is not None and num_images < 1):
        raise ConfigError("--offset must be >= 0, --per-class and --num-images >= 1")
    skipped: list[tuple[str, str]] = []
    groups: dict[int, list[Sample]] = {}
    desc: dict[str, Any] = {"kind": kind, "offset": offset, "per_class": per_class, "num_images": num_images}
    if kind == "synthetic":
        # Synthetic images are ids offset..offset+count-1 (the offset is global, not per class as for
        # folders): two selections are disjoint when one starts at or past the other's end.
        count = num_images if num_images is not None else (per_class or 1) * 8
        samples = [Sample(f"synthetic:{i}", i % synthetic_classes) for i in range(offset, offset + count)]
        desc["data_dir"] = None
        return Dataset(kind, "synthetic", samples, desc, skipped, synthetic_shape=tuple(synthetic_size))
    if data_dir is None:
        raise ConfigError(f"--dataset {kind} needs --data-dir DIR")
    root = Path(data_dir).expanduser().resolve()  # provenance must name it from any working directory
    if not root.is_dir():
        raise QuantpipeError(f"data directory {root} does not exist or is not a directory")
    desc["data_dir"] = str(root.resolve())
    if kind == "folder":
        groups[-1] = [Sample(str(p)) for p in _list_images(root, skipped, recursive=True)]
        desc["layout"] = "folder"
    else:
        wnids = imagenet_wnids()
        index = {w: i for i, w in enumerate(wnids)}
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _WNID.match(p.name))
        if class_dirs:
            desc["layout"] = "imagefolder"
            for d in class_dirs:
                if d.name not in index:
                    skipped.append((str(d), "folder name is not an ImageNet-1k wnid"))
                    continue
                groups[index[d.name]] = [Sample(str(p), index[d.name]) for p in _list_images(d, skipped, recursive=True)]
            desc["classes"] = len(groups)
        else:
            gt = Path(ground_truth).expanduser().resolve() if ground_truth else next((root / n for n in _GROUND_TRUTH_NAMES if (root / n).is_file()), None)
            if gt is None:
                raise QuantpipeError(
                    f"{root} has no <wnid>/ class folders and no ground-truth file ({', '.join(_GROUND_TRUTH_NAMES)}); "
                    "pass --ground-truth FILE for a flat ILSVRC validation folder, or use --dataset folder for unlabelled images")
            labels = read_ground_truth(gt, wnids)
            desc.update(layout="flat", ground_truth=str(gt))
            for p in _list_images(root, skipped, recursive=False):
                if p.stem not in labels:
                    skipped.append((str(p), f"not listed in {gt.name}"))
                    continue
                groups.setdefault(labels[p.stem], []).append(Sample(str(p), labels[p.stem]))
            desc["classes"] = len(groups)
    samples = _select(groups, offset, per_class, num_images)
    if not samples:
        raise QuantpipeError(f"no images selected from {root} (offset {offset}, per class {per_class}); "
                             f"check --data-dir and the selection options")
    for path, why in skipped:
        log.warning("skipping %s: %s", path, why)
    return Dataset(kind, str(root), samples, desc, skipped)


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Preprocessed images that decoded, with their positions in the dataset and labels (-1: none)."""

    ids: np.ndarray  # int64 [B]
    images: np.ndarray  # float32 [B, 3, H, W]
    labels: np.ndarray  # int64 [B]


def _synthetic_image(sample: Sample, size: tuple[int, int]) -> Any:
    """A reproducible, image-like (smooth + noise) RGB picture for the synthetic dataset."""
    from PIL import Image

    seed = int(sample.path.split(":")[1])
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(5, 40) + c) * np.cos(yy / rng.uniform(5, 40)) for c in range(3)], -1)
    arr = 127.5 + 100 * base + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def iter_batches(
    dataset: Dataset, preprocess: Preprocess, batch_size: int = 32, *, workers: int = 2
) -> Iterator[Batch]:
    """Decode and preprocess the dataset in order, ``batch_size`` images at a time (threads decode).

    An image that cannot be opened or decoded is logged, appended to ``dataset.skipped`` and left out
    of its batch; it never stops the run. Batches may therefore be shorter than ``batch_size``.
    """
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    # Import here, outside the per-image handler: a missing Pillow is an install problem (the CLI then
    # names the extra), not a reason to report every image as unreadable.
    import PIL.Image  # noqa: F401

    def load(item: tuple[int, Sample]) -> tuple[int, Sample, np.ndarray | None, str]:
        i, s = item
        try:
            if dataset.synthetic_shape is not None:
                return i, s, preprocess(_synthetic_image(s, dataset.synthetic_shape)), ""
            return i, s, preprocess.load(s.path), ""
        except ImportError:
            raise
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
            return i, s, None, f"{type(exc).__name__}: {exc}"

    items = list(enumerate(dataset.samples))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(items), batch_size):
            ids, arrays, labels = [], [], []
            for i, s, arr, why in pool.map(load, items[start: start + batch_size]):
                if arr is None:
                    log.warning("skipping unreadable image %s (%s)", s.path, why)
                    dataset.skipped.append((s.path, why))
                    continue
                ids.append(i)
                arrays.append(arr)
                labels.append(s.label)
            if arrays:
                yield Batch(np.asarray(ids, dtype=np.int64), np.stack(arrays), np.asarray(labels, dtype=np.int64))
