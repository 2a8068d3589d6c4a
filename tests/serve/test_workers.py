"""`quantpipe serve --workers N`: N front processes share the ports, the pipeline stays in the hub.

Real worker processes, real stage daemons (threads), the official tritonclient over HTTP and gRPC;
every answer is checked against the chained stages' output for the same images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from quantpipe.runtime.config import load_config
from quantpipe.serve.model import BUILTIN_MODEL_NAME as MODEL
from tests.serve.conftest import ServerThread, free_port, stages_in_threads, write_config
from tests.serve.test_http import _images, _input, chained


@pytest.fixture
def workers_pipeline(tmp_path):
    path = write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])
    cfg = load_config(path)
    with stages_in_threads(cfg), ServerThread(cfg, grpc=("127.0.0.1", 0), workers=2) as srv:
        srv.wait_ready()
        _wait_http_ready(srv.http_url)
        yield cfg, srv


def _wait_http_ready(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the front workers did not report ready"
        time.sleep(0.1)


def _worker_pids(srv) -> list[int]:
    return [p.pid for p in srv.server.hub._procs]


def test_two_workers_answer_http_and_grpc_exactly_and_the_hub_counts_every_request(workers_pipeline):
    cfg, srv = workers_pipeline
    pids = _worker_pids(srv)
    assert len(pids) == 2 and all(pid != os.getpid() for pid in pids)
    batches = [_images(1 + i % 3, seed=300 + i) for i in range(24)]
    # 24 connections: the kernel spreads them over both workers' listening sockets
    clients = [th.InferenceServerClient(srv.http_url) for _ in range(24)]
    for i, (c, x) in enumerate(zip(clients, batches)):
        r = c.infer(MODEL, [_input("input", x, "FP32")], request_id=str(i))
        assert r.get_response()["id"] == str(i)
        np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
    g = tg.InferenceServerClient(srv.grpc_url)
    assert g.is_server_ready() and g.is_model_ready(MODEL)
    x = _images(2, seed=7)
    i = tg.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    np.testing.assert_allclose(g.infer(MODEL, [i]).as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
    # classification is computed in the worker from the hub's logits
    out = th.InferRequestedOutput("logits", class_count=3)
    r = clients[0].infer(MODEL, [_input("input", x, "FP32")], outputs=[out])
    assert r.as_numpy("logits").shape == (2, 3)
    # one registry, in the hub: /metrics on any worker shows every request answered by either
    deadline = time.monotonic() + 5
    while True:
        text = urllib.request.urlopen(f"http://{srv.http_url}/metrics").read().decode()
        if 'quantpipe_serve_requests_total{outcome="ok",protocol="http"} 25.0' in text:
            break
        assert time.monotonic() < deadline, [ln for ln in text.splitlines() if "requests_total" in ln]
        time.sleep(0.1)
    assert 'quantpipe_serve_requests_total{outcome="ok",protocol="grpc"} 1.0' in text
    assert "quantpipe_serve_images_sent_total 52.0" in text  # 24 requests of 1-3 images (48), 2 + 2 more


def test_bad_requests_are_answered_by_the_worker_with_the_same_errors(workers_pipeline):
    cfg, srv = workers_pipeline
    c = th.InferenceServerClient(srv.http_url)
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.infer("resnet50", [_input("input", _images(1), "FP32")])
    with pytest.raises(InferenceServerException, match=r"shape \[N, 3, 32, 32\]"):
        c.infer(MODEL, [_input("input", _images(1)[:, :, :16], "FP32")])
    bad = np.full((1, 3, 32, 32), np.nan, np.float32)
    with pytest.raises(InferenceServerException, match="NaN"):
        c.infer(MODEL, [_input("input", bad, "FP32")])


def test_a_killed_worker_is_started_again_and_the_other_keeps_serving(workers_pipeline):
    cfg, srv = workers_pipeline
    victim = _worker_pids(srv)[0]
    old_id = srv.server.hub._workers[0]
    os.kill(victim, signal.SIGKILL)
    x = _images(1, seed=11)
    ok = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (ok < 10 or victim in _worker_pids(srv)):
        try:  # a new connection each time: some land on the survivor, none on the dead socket
            r = th.InferenceServerClient(srv.http_url).infer(MODEL, [_input("input", x, "FP32")])
            np.testing.assert_allclose(r.as_numpy("logits"), chained(cfg, x), rtol=1e-5, atol=1e-6)
            ok += 1
        except Exception:  # noqa: BLE001 - a connection the dead worker had accepted is reset
            time.sleep(0.05)
    pids = _worker_pids(srv)
    assert ok >= 10 and victim not in pids and len(pids) == 2
    deadline = time.monotonic() + 20  # the new worker says hello once it listens
    while srv.server.hub._workers.get(0) in (None, old_id):
        assert time.monotonic() < deadline, "the restarted worker did not come back"
        time.sleep(0.1)


def test_serve_with_workers_stops_on_sigterm_and_leaves_no_worker(tmp_path):
    path = write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])
    cfg = load_config(path)
    port = free_port()
    with stages_in_threads(cfg):
        p = subprocess.Popen([sys.executable, "-m", "quantpipe.cli", "serve", "--config", str(path),
                              "--http", f"127.0.0.1:{port}", "--workers", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_http_ready(f"127.0.0.1:{port}", 60)
            x = np.zeros((1, 3, 32, 32), np.float32)
            body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode()
            doc = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", data=body, method="POST"), timeout=10).read())
            assert doc["outputs"][0]["shape"] == [1, 1000]
            children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            assert len(children) >= 2, children
        finally:
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=30)
        assert p.returncode == 0, out
        assert "2 front worker processes" in out
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{c}") and "zombie" not in open(f"/proc/{c}/status").read().lower()
                  for c in children):
            assert time.monotonic() < deadline, f"front workers {children} outlived `quantpipe serve`"
            time.sleep(0.1)


def test_workers_must_be_at_least_one(tmp_path):
    path = write_config(tmp_path, ["builtin:identity"])
    r = subprocess.run([sys.executable, "-m", "quantpipe.cli", "serve", "--config", str(path), "--workers", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--workers must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_a_port_another_server_listens_on_is_refused_not_shared(tmp_path):
    import socket

    path = write_config(tmp_path, ["builtin:identity"])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another `serve --workers` would
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "quantpipe.cli", "serve", "--config", str(path), "--workers", "2",
                            "--http", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot listen" in r.stderr and "Traceback" not in r.stderr, r.stderr
