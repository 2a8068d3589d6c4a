"""Real data, real model: export DeiT-Tiny at --split 4,8, calibrate on a few ImageNet images and
evaluate on others. Small enough for CI; the full figures are in BENCHMARKS.md."""

from __future__ import annotations

import json

import pytest

from quantpipe.cli import main
from quantpipe.quant.table import ClipTable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deit_stages(deit_tiny_stages):
    return deit_tiny_stages


def test_calibrate_and_evaluate_deit_tiny_on_imagenet(deit_stages, imagenet_dev, tmp_path):
    table_path = tmp_path / "clip.json"
    assert main(["calibrate", "--stages", str(deit_stages), "--dataset", "imagenet", "--data-dir", str(imagenet_dev),
                 "--per-class", "1", "--num-images", "24", "--bits", "2,8", "--methods", "naive,ds_aciq,mse_pc,rot_aciq_pc",
                 "--out", str(table_path)]) == 0
    table = ClipTable.load(table_path, manifest=deit_stages)
    assert table.provenance["num_images"] == 24 and table.provenance["model"] == "deit_tiny_patch16_224"
    out = tmp_path / "report"
    # images 2.. of each class: never the calibration images
    assert main(["evaluate", "--stages", str(deit_stages), "--table", str(table_path), "--dataset", "imagenet",
                 "--data-dir", str(imagenet_dev), "--offset", "2", "--num-images", "24", "--bits", "32,8,2",
                 "--methods", "mse_pc,rot_aciq_pc", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 24
    assert res["fp32_top1"] >= 60.0  # the model is about 79% top-1; 24 images leave room for noise
    rows = {(r["method"], r["bits"]): r for r in res["rows"]}
    assert rows[("mse_pc", 8)]["agreement"] >= 90.0
    # at 2 bits the rotation keeps most predictions, where per-channel clipping alone loses many
    assert rows[("rot_aciq_pc", 2)]["agreement"] >= 60.0
