"""``quantpipe evaluate`` on small ONNX stages: the numbers equal a hand-run chain with wire frames,
the reports are written, overlapping or mismatched tables are refused."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from quantpipe import wire
from quantpipe.calib.chain import StageChain
from quantpipe.calib.data import iter_batches, open_dataset
from quantpipe.calib.evaluate import check_disjoint, evaluate
from quantpipe.cli import main
from quantpipe.quant.table import ClipTable

from .conftest import build_synthetic_stages

METHODS = "naive,ds_aciq,mse_pc,rot_mse_pc"


@pytest.fixture(scope="module")
def table_path(synthetic_stages, tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "clip.json"
    assert main(["calibrate", "--stages", str(synthetic_stages), "--dataset", "synthetic", "--num-images", "16",
                 "--bits", "2,4,8,16", "--methods", METHODS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def report_dir(synthetic_stages, table_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["evaluate", "--stages", str(synthetic_stages), "--table", str(table_path), "--dataset", "synthetic",
                 "--offset", "16", "--num-images", "12", "--batch-size", "5", "--bits", "32,16,4,2",
                 "--out", str(out)]) == 0
    return out


def _hand_run(stages, table: ClipTable, method: str, bits: int, images: np.ndarray) -> np.ndarray:
    """The pipeline as the daemons run it: stage, encode a frame, decode it, next stage."""
    chain = StageChain(stages)
    m = table.method_index(method)
    x = images
    for s in range(chain.num_stages):
        if s > 0:
            frames = wire.encode_frame(x, seq=7, first_id=0, stage=s - 1, bits=bits, table=table, boundary=s - 1, method=m)
            x = wire.decode_frame([bytes(f) for f in frames], table=table)[1]
        x = chain.run_stage(s, x)
    return x


def test_report_files_and_shape(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"accuracy.csv", "mse.csv", "report.md", "results.json", "accuracy.png"} <= names
    assert (report_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((report_dir / "accuracy.csv").open()))
    assert rows[0]["method"] == "fp32" and len(rows) == 1 + 4 * 4
    for r in rows:
        if r["bits"] == "32":
            assert float(r["agreement"]) == 100.0
    md = (report_dir / "report.md").read_text()
    assert "| method | 32 (fp32) | 16 bit | 4 bit | 2 bit |" in md
    assert "Top-1 agreement" in md and "Boundary 1" in md and "ds_aciq / aciq" not in md  # no aciq in this table
    mse = list(csv.DictReader((report_dir / "mse.csv").open()))
    assert len(mse) == 2 * 4 * 3  # boundaries x methods x quantized bitwidths


def test_quantization_error_falls_with_bits(report_dir):
    res = json.loads((report_dir / "results.json").read_text())
    mse = {(m["boundary"], m["method"], m["bits"]): m["mse"] for m in res["mse"]}
    for (b, method, bits), value in mse.items():
        if bits == 2:
            assert value > mse[(b, method, 4)] > mse[(b, method, 16)] >= 0
    agree = {(r["method"], r["bits"]): r["agreement"] for r in res["rows"]}
    # per channel, 16 bits is lossless for the argmax; per-tensor ACIQ-style clips cut the outlier channels
    for method in ("mse_pc", "rot_mse_pc"):
        assert agree[(method, 16)] == 100.0


def test_evaluate_equals_the_pipeline_run_by_hand(synthetic_stages, table_path):
    table = ClipTable.load(table_path)
    ds = open_dataset("synthetic", offset=16, num_images=6)
    chain = StageChain(synthetic_stages)
    result = evaluate(chain, table, ds, ["mse_pc", "rot_mse_pc"], [32, 4, 2], batch_size=4)
    images = np.concatenate([b.images for b in iter_batches(ds, chain.preprocess, 6)])
    ref = _hand_run(synthetic_stages, table, "mse_pc", 32, images).argmax(1)
    for method in ("mse_pc", "rot_mse_pc"):
        for bits in (4, 2):
            pred = _hand_run(synthetic_stages, table, method, bits, images).argmax(1)
            row = result.row(method, bits)
            assert row.agreement == pytest.approx(100.0 * np.mean(pred == ref))
            assert row.n == 6


def test_overlap_with_calibration_images_is_refused(synthetic_stages, table_path, capsys, tmp_path):
    table = ClipTable.load(table_path)
    assert check_disjoint(table, open_dataset("synthetic", num_images=20)) == 16
    assert check_disjoint(table, open_dataset("synthetic", offset=16, num_images=20)) == 0
    args = ["evaluate", "--stages", str(synthetic_stages), "--table", str(table_path), "--dataset", "synthetic",
            "--num-images", "4", "--bits", "32,8", "--methods", "mse_pc"]
    assert main(args) == 1
    assert "were used to calibrate" in capsys.readouterr().err
    assert main(args + ["--allow-overlap"]) == 0


def test_table_of_other_stages_is_refused(table_path, tmp_path, capsys):
    other = tmp_path / "other"
    build_synthetic_stages(other, seed=1)
    assert main(["evaluate", "--stages", str(other), "--table", str(table_path), "--dataset", "synthetic",
                 "--offset", "16", "--num-images", "2"]) == 1
    err = capsys.readouterr().err
    assert "calibrated for other stage graphs" in err and "quantpipe calibrate --stages" in err


def test_missing_bits_and_methods_say_what_to_do(synthetic_stages, table_path, capsys):
    base = ["evaluate", "--stages", str(synthetic_stages), "--table", str(table_path), "--dataset", "synthetic",
            "--offset", "16", "--num-images", "2"]
    assert main(base + ["--bits", "3"]) == 1
    assert "--bits" in capsys.readouterr().err
    assert main(base + ["--methods", "aciq_pc"]) == 1
    assert "quantpipe calibrate --methods" in capsys.readouterr().err


def test_overlap_that_cannot_be_checked_is_not_taken_as_disjoint(tmp_path):
    """A table whose calibration folder is gone cannot prove the evaluation images are new."""
    from quantpipe.calib.evaluate import check_disjoint as check

    class _Table:
        provenance = {"dataset": {"kind": "folder", "data_dir": str(tmp_path / "gone"), "offset": 0}}

    folder = tmp_path / "gone"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    dataset = open_dataset("folder", folder)
    folder.joinpath("a.png").unlink()
    folder.rmdir()
    assert check(_Table(), dataset) == -1
