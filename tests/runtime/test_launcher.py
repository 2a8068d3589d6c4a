"""The product commands as a user runs them: ``quantpipe run`` end to end (separate processes, emulated
bandwidth schedule), and a ``quantpipe stage`` daemon's metrics endpoint and SIGTERM exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, metrics_port: int = 0, count: int = 240, **pipeline) -> str:
    base = {"input_shape": [197, 64], "bits": [32, 16, 8, 4, 2], "window": 5, "microbatch": 4, "target_rate": 200.0}
    base.update(pipeline)
    lines = ["[pipeline]"] + [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    lines += ["[source]", f"count = {count}", "[sink]", f'address = "tcp://127.0.0.1:{_port()}"',
              "[[stages]]", 'engine = "builtin:linear"', f'address = "tcp://127.0.0.1:{_port()}"',
              f"metrics_port = {metrics_port}",
              "[[stages]]", 'engine = "builtin:head:100"', f'address = "tcp://127.0.0.1:{_port()}"']
    path = tmp_path / "pipeline.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_quantpipe_run_streams_images_and_writes_the_timeline(tmp_path):
    config = _config(tmp_path, count=600, bandwidth_schedule="0:200,1.5:10", shaping="emulate")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "quantpipe.cli", "run", "--config", config, "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "timeline:" in done.stdout and "images 600 (0 errors)" in done.stdout
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == list(range(600))
    assert all(len(r["top5"]) == 5 for r in results)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 600 and summary["in_order"]
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["pipeline"]["bandwidth_schedule"] == "0:200,1.5:10"  # the resolved config is kept
    header = (out / "timeline.csv").read_text().splitlines()[0]
    assert header == "t_s,link_mbit,bits,bandwidth_estimate_mbit,output_rate_img_s,top1"
    assert (out / "timeline.png").stat().st_size > 10_000
    # the emulated link went from 200 to 10 Mbit/s: the stage must have narrowed its frames
    windows = [json.loads(line) for line in (out / "events-stage0.jsonl").read_text().splitlines()]
    bits = [w["next_bits"] for w in windows if w.get("event") == "window"]
    assert bits[0] == 32 and min(bits) < 16, bits


def test_stage_daemon_serves_metrics_and_exits_0_on_sigterm(tmp_path):
    port, health = _port(), _port()
    config = _config(tmp_path, metrics_port=port, policy="fixed", fixed_bits=32)
    proc = subprocess.Popen([sys.executable, "-m", "quantpipe.cli", "stage", "--config", config, "--stage", "0",
                             "--health-port", str(health)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        body = None
        while body is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no metrics endpoint"
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
        for name in ("quantpipe_images_sent_total", "quantpipe_bytes_sent_total", "quantpipe_bitwidth",
                     "quantpipe_bandwidth_bytes_per_second", "quantpipe_queue_depth", "quantpipe_stage_seconds_bucket",
                     "quantpipe_codec_seconds_bucket", "quantpipe_resends_total"):
            assert name in body, name
        assert 'quantpipe_bitwidth{stage="0"} 32.0' in body
        for _ in range(50):  # live once the loop has ticked
            try:
                live = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2).read())
                break
            except urllib.error.HTTPError:
                time.sleep(0.1)
        assert live["status"] == "ok"
        with pytest.raises(urllib.error.HTTPError):  # no upstream or downstream peer yet: not ready
            urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopped (drained)" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
