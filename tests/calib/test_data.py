"""Datasets and preprocessing: timm equivalence, ImageNet layouts, deterministic disjoint selection,
unreadable files skipped, and no torch/timm import on the calibration side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantpipe.calib.data import Preprocess, imagenet_wnids, iter_batches, open_dataset, read_ground_truth
from quantpipe.errors import ConfigError, QuantpipeError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

WNIDS = imagenet_wnids()


def _timm_transform(config: dict):
    pytest.importorskip("timm")
    from timm.data import create_transform

    return create_transform(**config, is_training=False)


def _write_image(path: Path, size=(40, 30), seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze() if channels == 1 else arr, mode).save(path)
    return path


def test_wnid_list_is_timms():
    timm = pytest.importorskip("timm")
    ref = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert WNIDS == ref and len(WNIDS) == 1000


CONFIGS = [
    {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    {"input_size": (3, 160, 160), "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center",
     "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    {"input_size": (3, 96, 96), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash",
     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
]


@pytest.mark.parametrize("config", CONFIGS, ids=["deit", "bilinear", "squash"])
@pytest.mark.parametrize("size,mode", [((500, 375), "RGB"), ((301, 517), "RGB"), ((257, 256), "L"), ((60, 50), "RGB")])
def test_preprocess_matches_timm_eval_transform(config, size, mode, tmp_path):
    t = _timm_transform(config)
    path = _write_image(tmp_path / "x.png", size, seed=size[0], mode=mode)
    ours = Preprocess.from_config(config).load(path)
    ref = t(Image.open(path).convert("RGB")).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_preprocess_matches_timm_on_real_images(imagenet_dev):
    t = _timm_transform(CONFIGS[0])
    files = sorted(imagenet_dev.glob("*/*"))[::97][:8]
    pre = Preprocess.from_config(CONFIGS[0])
    for f in files:
        np.testing.assert_allclose(pre.load(f), t(Image.open(f).convert("RGB")).numpy(), rtol=0, atol=2e-6)


def test_unsupported_preprocessing_is_refused():
    with pytest.raises(ConfigError, match="crop_mode"):
        Preprocess.from_config({"crop_mode": "border"})
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocess.from_config({"interpolation": "magic"})


def _imagefolder(root: Path, wnids: list[str], per_class: int) -> Path:
    for c, w in enumerate(wnids):
        (root / w).mkdir(parents=True)
        for i in range(per_class):
            _write_image(root / w / f"{w}_{i:03d}.JPEG", seed=c * 100 + i)
    return root


def test_imagefolder_labels_and_disjoint_balanced_selection(tmp_path):
    wnids = [WNIDS[7], WNIDS[3], WNIDS[999]]
    root = _imagefolder(tmp_path / "data", wnids, per_class=5)
    calib = open_dataset("imagenet", root, per_class=2)
    evals = open_dataset("imagenet", root, offset=2)
    assert len(calib) == 6 and len(evals) == 9
    assert not {s.path for s in calib.samples} & {s.path for s in evals.samples}
    # class index = position in the sorted wnid list; ordered rank by rank across classes
    assert [s.label for s in calib.samples] == [3, 7, 999, 3, 7, 999]
    assert Path(calib.samples[0].path).name == f"{WNIDS[3]}_000.JPEG"
    assert [s.label for s in open_dataset("imagenet", root, num_images=4).samples] == [3, 7, 999, 3]
    assert calib.description["layout"] == "imagefolder" and calib.description["classes"] == 3


def test_flat_ilsvrc_validation_layout_with_ground_truth(tmp_path):
    root = tmp_path / "val"
    root.mkdir()
    truth = {f"ILSVRC2012_val_{i:08d}": WNIDS[(i * 37) % 1000] for i in range(1, 9)}
    for i, name in enumerate(truth):
        _write_image(root / f"{name}.JPEG", seed=i)
    lines = ["ImageId,PredictionString"] + [f"{n},{w} 10 20 30 40 {w} 1 2 3 4" for n, w in truth.items()]
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    ds = open_dataset("imagenet", root)  # finds the ground truth next to the images
    assert len(ds) == 8 and ds.description["layout"] == "flat"
    assert {Path(s.path).stem: s.label for s in ds.samples} == {n: WNIDS.index(w) for n, w in truth.items()}
    # the "<file> <index>" form, given explicitly, with a per-class split
    gt = tmp_path / "val.txt"
    gt.write_text("".join(f"{n}.JPEG {WNIDS.index(w)}\n" for n, w in truth.items()))
    ds2 = open_dataset("imagenet", root, ground_truth=gt, per_class=1)
    assert sorted(s.label for s in ds2.samples) == sorted(WNIDS.index(w) for w in truth.values())
    batches = list(iter_batches(ds2, Preprocess(input_size=(3, 32, 32)), batch_size=3))
    assert sum(len(b.ids) for b in batches) == 8 and batches[0].images.shape == (3, 3, 32, 32)


def test_devkit_ground_truth_is_refused_with_advice(tmp_path):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n361\n171\n822\n297\n")
    with pytest.raises(QuantpipeError, match="LOC_val_solution.csv"):
        read_ground_truth(gt, WNIDS)


def test_flat_folder_without_ground_truth_says_what_to_do(tmp_path):
    _write_image(tmp_path / "a.jpg")
    with pytest.raises(QuantpipeError, match="--ground-truth"):
        open_dataset("imagenet", tmp_path)


def test_unreadable_and_non_image_files_are_skipped_not_fatal(tmp_path, caplog):
    root = _imagefolder(tmp_path / "data", [WNIDS[1], WNIDS[2]], per_class=2)
    (root / WNIDS[1] / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / WNIDS[2] / "notes.txt").write_text("hello")
    (root / WNIDS[2] / "empty.png").write_bytes(b"")
    ds = open_dataset("imagenet", root)
    assert len(ds) == 6  # 4 good + 2 broken images; the .txt is never selected
    batches = list(iter_batches(ds, Preprocess(input_size=(3, 32, 32)), batch_size=4))
    assert sum(len(b.ids) for b in batches) == 4
    reasons = dict(ds.skipped)
    assert str(root / WNIDS[2] / "notes.txt") in reasons
    assert str(root / WNIDS[1] / "broken.jpg") in reasons and str(root / WNIDS[2] / "empty.png") in reasons
    assert "skipping unreadable image" in caplog.text


def test_folder_dataset_is_unlabelled_and_recursive(tmp_path):
    _write_image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    _write_image(tmp_path / "sub" / "b.jpg", seed=1)
    ds = open_dataset("folder", tmp_path)
    assert len(ds) == 2 and not ds.labelled and all(s.label == -1 for s in ds.samples)


def test_synthetic_dataset_is_deterministic_and_offset_disjoint():
    pre = Preprocess(input_size=(3, 32, 32))
    a = next(iter_batches(open_dataset("synthetic", num_images=4), pre, 4))
    b = next(iter_batches(open_dataset("synthetic", num_images=4), pre, 4))
    c = next(iter_batches(open_dataset("synthetic", num_images=4, offset=4), pre, 4))
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.allclose(a.images, c.images) and list(c.labels) == [4, 5, 6, 7]


def test_bad_selection_options():
    with pytest.raises(ConfigError):
        open_dataset("imagenet", ".", offset=-1)
    with pytest.raises(ConfigError, match="--data-dir"):
        open_dataset("imagenet", None)
    with pytest.raises(ConfigError, match="unknown dataset"):
        open_dataset("coco", ".")


def test_calibration_side_does_not_import_torch_or_timm():
    code = ("import sys; import quantpipe.calib.data, quantpipe.calib.calibrate, quantpipe.calib.evaluate, "
            "quantpipe.calib.report, quantpipe.calib.chain; "
            "heavy = [m for m in ('torch', 'timm', 'onnx', 'matplotlib') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_missing_pillow_is_an_install_error_not_unreadable_images(monkeypatch, tmp_path):
    """Without Pillow, decoding must stop with ModuleNotFoundError (the CLI turns it into
    'pip install quantpipe[calib]'), not skip every image as unreadable."""
    import sys

    from quantpipe.calib import data

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not really a jpeg")
    dataset = data.open_dataset("folder", folder)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    preprocess = data.Preprocess.from_config({"input_size": [3, 32, 32], "interpolation": "bilinear",
                                              "crop_pct": 1.0, "crop_mode": "center",
                                              "mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(ModuleNotFoundError):
        list(data.iter_batches(dataset, preprocess, 4))
    assert dataset.skipped == []
