"""``quantpipe bench pipeline`` runs real processes end to end and reads the daemons' per-part CPU metrics."""

from __future__ import annotations

import json

import pytest

from quantpipe.cli import main


@pytest.mark.slow
def test_bench_pipeline_reports_rates_and_hop_cpu(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["bench", "pipeline", "--microbatch", "8", "--bits", "32,8", "--methods", "aciq_pc,rot_aciq_pc",
               "--stages", "2", "--images", "96", "--repeat", "1", "--out", str(tmp_path / "runs"),
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert [(r["method"], r["bits"]) for r in run["results"]] == [("none", 32), ("aciq_pc", 8), ("rot_aciq_pc", 8)]
    for r in run["results"]:
        assert r["images"] == 96 and r["errors"] == 0 and r["rate"] > 0
        assert len(r["hops"]) == 2
        for hop in r["hops"]:
            assert hop["microbatches"] == 12
            assert all(hop[p] >= 0 for p in ("validate", "decode", "engine", "encode", "send"))
        # stage 0 decodes 32-bit input and encodes the boundary; stage 1 decodes it
        if r["bits"] == 8:
            assert r["hops"][1]["decode"] > r["hops"][0]["decode"]
    assert "x32" in capsys.readouterr().out
