"""The evaluate report: Table-1-shaped Markdown, target verdicts, DS-ACIQ/ACIQ MSE ratio, CSV and PNG."""

from __future__ import annotations

import csv

import pytest

from quantpipe.calib.report import AccuracyRow, EvalResult, MseRow, markdown_report, write_reports


def _result(labelled: bool = True) -> EvalResult:
    top = (lambda v: v) if labelled else (lambda v: None)
    rows = [AccuracyRow(m, 32, top(80.0), top(95.0), 100.0, 10) for m in ("aciq", "ds_aciq")]
    rows += [AccuracyRow("aciq", 8, top(79.9), top(95.0), 99.0, 10), AccuracyRow("aciq", 2, top(60.0), top(80.0), 70.0, 10),
             AccuracyRow("ds_aciq", 8, top(79.0), top(94.0), 97.0, 10), AccuracyRow("ds_aciq", 2, top(72.0), top(90.0), 85.0, 10)]
    mse = [MseRow(0, "aciq", 8, 2.0e-4, 1e-3), MseRow(0, "ds_aciq", 8, 1.0e-4, 5e-4),
           MseRow(0, "aciq", 2, 0.5, 0.1), MseRow(0, "ds_aciq", 2, 0.75, 0.15)]
    return EvalResult(top(80.0), top(95.0), 10, rows, mse, {"model": "deit_tiny_patch16_224", "split": [4, 8]})


def test_markdown_has_table1_shape_targets_and_mse_ratio():
    md = markdown_report(_result())
    assert "| method | 32 (fp32) | 8 bit | 2 bit |" in md
    assert "| aciq | 80.00 | 79.90 | 60.00 |" in md  # top-1 row
    assert "| ds_aciq | 0.00 | 1.00 | 8.00 |" in md  # drop row
    # best at 8 bits is aciq (drop 0.1 <= 0.2); best at 2 bits is ds_aciq (drop 8 <= 10)
    assert "| 8 | aciq | 79.90 | 0.10 | <= 0.2 | met |" in md
    assert "| 2 | ds_aciq | 72.00 | 8.00 | <= 10 | met |" in md
    assert "| **ds_aciq / aciq** | 0.50 | 1.50 |" in md


def test_missed_target_states_the_distance():
    res = _result()
    res.rows = [r for r in res.rows if not (r.method == "aciq" and r.bits == 8)]
    assert "| 8 | ds_aciq | 79.00 | 1.00 | <= 0.2 | missed by 0.80 |" in markdown_report(res)


def test_unlabelled_data_reports_agreement_only(tmp_path):
    res = _result(labelled=False)
    md = markdown_report(res)
    assert "Top-1 accuracy" not in md and "Top-1 agreement" in md and "Targets" not in md
    write_reports(res, tmp_path)
    rows = list(csv.DictReader((tmp_path / "accuracy.csv").open()))
    assert rows[1]["top1"] == "-" and float(rows[1]["agreement"]) == 100.0


def test_write_reports_files(tmp_path):
    paths = write_reports(_result(), tmp_path / "out")
    assert [p.name for p in paths] == ["accuracy.csv", "mse.csv", "report.md", "results.json", "accuracy.png"]
    rows = list(csv.DictReader((tmp_path / "out" / "accuracy.csv").open()))
    assert rows[0] == {"method": "fp32", "bits": "32", "top1": "80.0000", "top5": "95.0000", "agreement": "100.0000",
                       "drop": "0.0000", "n": "10"}
    assert float(rows[-1]["drop"]) == pytest.approx(8.0)
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
