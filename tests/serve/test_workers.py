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
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from quantpipe.runtime.config import load_config
from quantpipe.serve.model import BUILTIN_MODEL_NAME as MODEL
from tests.serve.conftest import (ServerThread, free_port, serve_cli, stages_in_threads, wait_http_ready,
                                  write_config)
from tests.serve.test_http import _images, _input, chained


@pytest.fixture
def workers_pipeline(tmp_path):
    path = write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])
    cfg = load_config(path)
    with stages_in_threads(cfg), ServerThread(cfg, grpc=("127.0.0.1", 0), workers=2) as srv:
        srv.wait_ready()
        time.sleep(0.6)  # the hub tells every worker within 0.25 s
        wait_http_ready(srv.http_url)
        yield cfg, srv


def _infer_once(url: str, x: np.ndarray, **client_kw):
    """One request on a new connection (so that the kernel may pick either worker), closed after."""
    c = th.InferenceServerClient(url, **client_kw)
    try:
        return c.infer(MODEL, [_input("input", x, "FP32")])
    finally:
        c.close()


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
        try:
            text = urllib.request.urlopen(f"http://{srv.http_url}/metrics", timeout=5).read().decode()
        except urllib.error.HTTPError:  # 503 from a worker whose hub was slow to answer on a busy machine
            text = ""
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
            r = _infer_once(srv.http_url, x)
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
            wait_http_ready(f"127.0.0.1:{port}", 60, p)
            x = np.zeros((1, 3, 32, 32), np.float32)
            body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode()
            doc = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", data=body, method="POST"), timeout=10).read())
            assert doc["outputs"][0]["shape"] == [1, 1000]
            children = [c for c in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                  text=True).stdout.split()
                        if "spawn_main" in open(f"/proc/{c}/cmdline").read()]  # not multiprocessing's tracker
            assert len(children) == 2, children
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
    r = serve_cli(path, "--workers", "0")
    assert r.returncode == 1 and "--workers must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_a_port_another_server_listens_on_is_refused_not_shared(tmp_path):
    import socket

    path = write_config(tmp_path, ["builtin:identity"])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another `serve --workers` would
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = serve_cli(path, "--workers", "2", "--http", f"127.0.0.1:{port}")
    assert r.returncode == 1 and "cannot listen" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_multi_image_requests_are_admitted_one_by_one_against_the_queue_bound(tmp_path):
    """64 concurrent 3-image requests against a queue of 8 images: each is answered on its own (results
    or 503 queue full), none is refused as too large because others arrived with it."""
    from concurrent.futures import ThreadPoolExecutor

    from quantpipe.serve.service import ServeOptions

    path = write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])
    cfg = load_config(path)
    with stages_in_threads(cfg), ServerThread(cfg, workers=2, options=ServeOptions(max_queue_images=8)) as srv:
        srv.wait_ready()
        time.sleep(0.6)
        x = _images(3, seed=5)
        expected = chained(cfg, x)

        def call(_):
            try:
                r = _infer_once(srv.http_url, x)
                np.testing.assert_allclose(r.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
                return "ok"
            except InferenceServerException as exc:
                return str(exc)

        with ThreadPoolExecutor(64) as pool:
            outcomes = list(pool.map(call, range(64)))
    assert "ok" in outcomes
    assert all(o == "ok" or "queue" in o for o in outcomes), [o for o in outcomes if o != "ok"][:3]


def test_stopping_lets_workers_answer_the_requests_they_hold(tmp_path):
    """No stage runs, so requests wait in the hub's queue; stopping the server meanwhile must still
    answer each (504 at its timeout), as a single-process server does, not drop the connections."""
    from concurrent.futures import ThreadPoolExecutor

    from quantpipe.serve.service import ServeOptions

    path = write_config(tmp_path, ["builtin:identity"])
    cfg = load_config(path)
    srv = ServerThread(cfg, workers=2, options=ServeOptions(timeout_s=7.0)).__enter__()  # > 5 s
    time.sleep(0.6)
    url = srv.http_url

    def call(_):
        try:
            _infer_once(url, _images(1), network_timeout=30)
            return "ok"
        except InferenceServerException as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a dropped connection is what must not happen
            return f"connection: {exc!r}"

    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(call, i) for i in range(4)]
        time.sleep(1.0)  # the requests are queued in the hub
        t0 = time.monotonic()
        srv.__exit__(None, None, None)
        outcomes = [f.result(timeout=60) for f in pending]
    assert all("504" in o and "timeout" in o for o in outcomes), outcomes
    assert time.monotonic() - t0 < 20


def test_the_same_port_for_http_and_grpc_is_refused(tmp_path):
    from quantpipe.errors import ConfigError
    from quantpipe.serve.command import Server

    cfg = load_config(write_config(tmp_path, ["builtin:identity"]))
    port = free_port()
    with pytest.raises(ConfigError, match="different ports"):
        Server(cfg, http=("127.0.0.1", port), grpc=("127.0.0.1", port), workers=2)
