"""``quantpipe calibrate`` end to end on small ONNX stages: the table it writes, and that its ranges are
those of a single pass over the boundary tensors (rotated ones for rot_* methods)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantpipe.calib.calibrate import calibrate, resolve_methods
from quantpipe.calib.chain import StageChain
from quantpipe.calib.data import Preprocess, iter_batches, open_dataset
from quantpipe.cli import main
from quantpipe.errors import ConfigError
from quantpipe.quant.table import ClipTable

from .conftest import C

METHODS = "naive,aciq,ds_aciq,aciq_pc,mse_pc,rot_mse_pc,rot_aciq_pc"


@pytest.fixture(scope="module")
def table_path(synthetic_stages, tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "clip.json"
    code = main(["calibrate", "--stages", str(synthetic_stages), "--dataset", "synthetic", "--num-images", "24",
                 "--batch-size", "8", "--bits", "2,4,8,16", "--methods", METHODS, "--out", str(out)])
    assert code == 0
    return out


def test_calibrate_writes_a_table_that_matches_its_stages(table_path, synthetic_stages, capsys):
    table = ClipTable.load(table_path, manifest=synthetic_stages)
    assert table.methods == tuple(METHODS.split(",")) and table.bits == (2, 4, 8, 16) and table.boundaries == (0, 1)
    prov = table.provenance
    assert prov["num_images"] == 24 and prov["dataset"]["kind"] == "synthetic" and prov["split"] == [1, 2]
    manifest = json.loads((synthetic_stages / "manifest.json").read_text())
    assert [s["sha256"] for s in prov["stages"]] == [s["sha256"] for s in manifest["stages"]]
    assert prov["tool"]["quantpipe"] and "quantpipe calibrate" in prov["command"]
    for b in table.boundaries:
        assert np.ndim(table.ranges(b, table.method_index("naive"), 4)[0]) == 0
        assert table.ranges(b, table.method_index("mse_pc"), 4)[0].shape == (C,)
        r = table.transform(b, table.method_index("rot_mse_pc"))
        np.testing.assert_allclose(r @ r.T, np.eye(C), atol=1e-5)
        # the two rotated methods share one stored matrix
        assert table.transform(b, table.method_index("rot_aciq_pc")) is r
    doc = json.loads(table_path.read_text())
    assert len(doc["boundaries"][0]["transforms"]) == 1


def test_clip_ranges_shrink_with_fewer_bits(table_path):
    table = ClipTable.load(table_path)
    for name in ("aciq", "aciq_pc", "mse_pc"):
        m = table.method_index(name)
        widths = [np.mean(np.subtract(*table.ranges(0, m, k)[::-1])) for k in (2, 4, 8)]
        assert widths[0] < widths[1] <= widths[2], (name, widths)


def test_table_ranges_are_those_of_one_pass_over_the_boundary_tensors(table_path, synthetic_stages):
    """Rebuild the boundary tensors by hand and compute the ranges with the reference functions."""
    from quantpipe.quant.clipping import clip_range

    table = ClipTable.load(table_path)
    chain = StageChain(synthetic_stages)
    ds = open_dataset("synthetic", num_images=24)
    tensors = [[], []]
    for batch in iter_batches(ds, chain.preprocess, 8):
        b0 = chain.run_stage(0, batch.images)
        tensors[0].append(b0)
        tensors[1].append(chain.run_stage(1, b0))
    for b in (0, 1):
        x = np.concatenate(tensors[b])
        for name in ("naive", "aciq_pc"):
            lo, hi = clip_range(x, name, 4)
            tlo, thi = table.ranges(b, table.method_index(name), 4)
            np.testing.assert_allclose(tlo, lo, rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(thi, hi, rtol=1e-3, atol=1e-4)
        # rotated methods observe x @ R
        m = table.method_index("rot_aciq_pc")
        lo, hi = clip_range(x @ table.transform(b, m), "aciq_pc", 4)
        tlo, thi = table.ranges(b, m, 4)
        np.testing.assert_allclose(tlo, lo, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(thi, hi, rtol=1e-3, atol=1e-4)


def test_rotation_tames_the_outlier_channels(table_path):
    """The synthetic residual stream has two huge channels; after rotation no channel range is that wide."""
    table = ClipTable.load(table_path)
    lo, hi = table.ranges(0, table.method_index("naive"), 8)
    plain = np.subtract(*table.ranges(0, table.method_index("mse_pc"), 8)[::-1])
    rotated = np.subtract(*table.ranges(0, table.method_index("rot_mse_pc"), 8)[::-1])
    assert plain.max() > 3 * np.median(plain)
    assert rotated.max() < plain.max() / 2


def test_unreadable_images_are_reported_and_skipped(synthetic_stages, tmp_path, capsys):
    from quantpipe.calib.data import imagenet_wnids
    from PIL import Image

    wnid = imagenet_wnids()[5]
    (tmp_path / "data" / wnid).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / "data" / wnid / f"{i}.png")
    (tmp_path / "data" / wnid / "bad.jpg").write_bytes(b"garbage")
    out = tmp_path / "t.json"
    assert main(["calibrate", "--stages", str(synthetic_stages), "--dataset", "imagenet", "--data-dir",
                 str(tmp_path / "data"), "--bits", "4", "--methods", "naive,mse_pc", "--out", str(out)]) == 0
    table = ClipTable.load(out)
    assert table.provenance["num_images"] == 3 and table.provenance["dataset"]["skipped"] == 1
    assert "1 files skipped" in capsys.readouterr().out


def test_user_errors_are_one_line_messages(synthetic_stages, tmp_path, capsys):
    base = ["calibrate", "--stages", str(synthetic_stages), "--dataset", "synthetic", "--num-images", "2",
            "--out", str(tmp_path / "t.json")]
    assert main(base + ["--methods", "naive,bogus"]) == 1
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert main(base + ["--bits", "2,32"]) == 1
    assert "cannot be calibrated" in capsys.readouterr().err
    assert main(["calibrate", "--stages", str(tmp_path / "nowhere"), "--dataset", "synthetic", "--out", "x"]) == 1
    assert "quantpipe export" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        resolve_methods(["mse_pc", "mse_pc"])


def test_library_entry_point_needs_some_readable_image(synthetic_stages, tmp_path):
    from quantpipe.errors import QuantpipeError

    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    ds = open_dataset("folder", tmp_path)
    with StageChain(synthetic_stages) as chain, pytest.raises(QuantpipeError, match="nothing to calibrate"):
        calibrate(chain, ds, resolve_methods(["naive"]), [4])
    assert isinstance(Preprocess.from_config({}), Preprocess)


def test_calibrate_on_the_flat_ilsvrc_validation_layout(synthetic_stages, tmp_path):
    """The layout of a real ImageNet validation download: flat JPEGs plus LOC_val_solution.csv."""
    from quantpipe.calib.data import imagenet_wnids
    from PIL import Image

    wnids = imagenet_wnids()
    val = tmp_path / "val"
    val.mkdir()
    lines = ["ImageId,PredictionString"]
    for i in range(1, 7):
        name = f"ILSVRC2012_val_{i:08d}"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(val / f"{name}.JPEG")
        lines.append(f"{name},{wnids[i * 100]} 1 2 3 4")
    (val / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "t.json"
    assert main(["calibrate", "--stages", str(synthetic_stages), "--dataset", "imagenet", "--data-dir", str(val),
                 "--bits", "2", "--methods", "aciq", "--out", str(out)]) == 0
    prov = ClipTable.load(out).provenance
    assert prov["num_images"] == 6 and prov["dataset"]["layout"] == "flat"
    assert prov["dataset"]["ground_truth"].endswith("LOC_val_solution.csv")
