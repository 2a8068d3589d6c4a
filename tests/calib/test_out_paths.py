"""Unusable --out paths and impossible bitwidths are refused before any slow work starts."""

from __future__ import annotations

import pytest

from quantpipe import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "--stages", "{missing}", "--dataset", "synthetic", "--out", "{dir}"], "is a directory"),
        (["evaluate", "--stages", "{missing}", "--table", "t.json", "--dataset", "synthetic", "--out", "{file}"], "is a file"),
        (["evaluate", "--stages", "{missing}", "--table", "t.json", "--dataset", "synthetic", "--bits", "8,33"], "--bits 33"),
    ],
)
def test_refused_before_work(tmp_path, capsys, argv, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    paths = {"missing": str(tmp_path / "no-stages"), "dir": str(tmp_path / "d"), "file": str(tmp_path / "f")}
    assert cli.main([a.format(**paths) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
