"""Bounded and honest: a full queue refuses at once (503), a slow pipeline answers 504 at the timeout,
a stage's failure comes back as an error, and a stage killed with -9 and restarted under load leaves
every request answered exactly once, by its own correct result or by an error."""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from quantpipe.runtime.config import load_config
from quantpipe.serve.model import BUILTIN_MODEL_NAME as MODEL
from quantpipe.serve.service import ServeOptions
from tests.serve.conftest import ServerThread, stages_in_threads, start_stage_process, stop_process, write_config
from tests.serve.test_http import _images, _input, chained


def _call(url: str, x: np.ndarray, timeout_s: float = 30.0) -> tuple[object, float]:
    """One blocking infer: (logits or the exception, seconds)."""
    c = th.InferenceServerClient(url, network_timeout=timeout_s, connection_timeout=timeout_s)
    t0 = time.monotonic()
    try:
        return c.infer(MODEL, [_input("input", x, "FP32")]).as_numpy("logits"), time.monotonic() - t0
    except InferenceServerException as exc:
        return exc, time.monotonic() - t0
    finally:
        c.close()


def _concurrently(url: str, inputs: list[np.ndarray]) -> list[tuple[object, float]]:
    out: list = [None] * len(inputs)

    def work(i: int) -> None:
        out[i] = _call(url, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_full_queue_refuses_at_once_and_the_rest_succeed(tmp_path):
    cfg = load_config(write_config(tmp_path, ["builtin:sleep:150", "builtin:head:1000"], microbatch=1, credits=1))
    opts = ServeOptions(max_queue_images=2, max_queue_delay_us=0, timeout_s=30)
    with stages_in_threads(cfg), ServerThread(cfg, options=opts) as srv:
        srv.wait_ready()
        inputs = [_images(1, seed=i) for i in range(12)]
        answers = _concurrently(srv.http_url, inputs)
    refused = [(a, t) for a, t in answers if isinstance(a, InferenceServerException)]
    served = [(i, a) for i, (a, _) in enumerate(answers) if not isinstance(a, InferenceServerException)]
    assert refused and served
    for exc, seconds in refused:
        assert exc.status() == "503" and "queue is full" in exc.message()
        assert seconds < 1.0  # refused at once, not after waiting for the busy pipeline
    for i, y in served:
        np.testing.assert_allclose(y, chained(cfg, inputs[i]), rtol=1e-5, atol=1e-6)


def test_timeout_answers_504_in_time(tmp_path):
    cfg = load_config(write_config(tmp_path, ["builtin:sleep:800", "builtin:head:1000"], microbatch=1, credits=1))
    with stages_in_threads(cfg), ServerThread(cfg, options=ServeOptions(timeout_s=0.4)) as srv:
        srv.wait_ready()
        answers = _concurrently(srv.http_url, [_images(1, seed=i) for i in range(2)])
        text = urllib.request.urlopen(f"http://{srv.http_url}/metrics").read().decode()
    for exc, seconds in answers:
        assert isinstance(exc, InferenceServerException) and exc.status() == "504"
        assert "no result within the timeout of 0.4 s" in exc.message()
        assert seconds < 1.5
    assert 'quantpipe_serve_failures_total{protocol="http",reason="timeout"} 2.0' in text


def test_a_stage_failure_comes_back_as_an_error(tmp_path):
    cfg = load_config(write_config(tmp_path, ["builtin:identity", "builtin:head:1000"]))
    wrong = cfg.replace(input_shape=(3, 32, 16))  # the stages expect another shape: their engine fails
    with stages_in_threads(wrong), ServerThread(cfg) as srv:
        srv.wait_ready()
        exc, _ = _call(srv.http_url, _images(2))
    assert isinstance(exc, InferenceServerException) and exc.status() == "500"
    assert "stage 0 engine failed" in exc.message()


@pytest.mark.slow
def test_stage_killed_and_restarted_under_load_every_request_answered_once(tmp_path):
    path = write_config(tmp_path, ["builtin:identity", "builtin:linear", "builtin:head:1000"], microbatch=2)
    cfg = load_config(path)
    procs = [start_stage_process(path, k) for k in range(3)]
    sent = 0
    try:
        with ServerThread(cfg, options=ServeOptions(timeout_s=6.0)) as srv:
            srv.wait_ready(30)
            stop = threading.Event()
            answers: list[tuple[np.ndarray, object]] = []
            lock = threading.Lock()

            def client(seed: int) -> None:
                nonlocal sent
                rng = np.random.default_rng(seed)
                while not stop.is_set():
                    x = rng.standard_normal((int(rng.integers(1, 4)), 3, 32, 32)).astype(np.float32)
                    with lock:
                        sent += 1
                    a, _ = _call(srv.http_url, x, timeout_s=20)
                    with lock:
                        answers.append((x, a))

            clients = [threading.Thread(target=client, args=(s,)) for s in range(6)]
            for t in clients:
                t.start()
            time.sleep(1.5)
            procs[1].kill()  # -9: what it held dies with it
            assert procs[1].wait(5) == -9
            time.sleep(0.5)
            procs[1] = start_stage_process(path, 1)
            time.sleep(4.0)
            stop.set()
            for t in clients:
                t.join(30)
            text = urllib.request.urlopen(f"http://{srv.http_url}/metrics").read().decode()
    finally:
        for p in procs:
            stop_process(p)
    assert len(answers) == sent > 20
    ok = [(x, a) for x, a in answers if isinstance(a, np.ndarray)]
    errors = [a for _, a in answers if not isinstance(a, np.ndarray)]
    for x, y in ok:  # every result is the request's own
        np.testing.assert_allclose(y, chained(cfg, x), rtol=1e-5, atol=1e-6)
    for e in errors:
        assert isinstance(e, InferenceServerException) and e.status() in ("503", "504"), e
    assert len(ok) > len(answers) // 2, f"{len(ok)} results, {len(errors)} errors"
    print(f"kill -9 under load: {len(answers)} requests, {len(ok)} results, {len(errors)} errors")
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("quantpipe_serve_requests_total{"))
    assert counted == sent  # the server answered each request once: no lost and no double answers


def test_not_ready_while_a_middle_stage_is_down(tmp_path):
    cfg = load_config(write_config(tmp_path, ["builtin:identity", "builtin:linear", "builtin:head:1000"]))
    with stages_in_threads(cfg) as daemons, ServerThread(cfg, options=ServeOptions(timeout_s=2.0, stall_s=0.5)) as srv:
        srv.wait_ready()
        c = th.InferenceServerClient(srv.http_url)
        assert c.is_server_ready()
        daemons[1].stop()  # the ends keep heartbeating the server; only the missing results show it
        time.sleep(1.5)
        answer: list = []
        t = threading.Thread(target=lambda: answer.append(_call(srv.http_url, _images(1))))
        t.start()
        deadline = time.monotonic() + 1.5
        while c.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not c.is_server_ready() and not c.is_model_ready(MODEL)
        t.join(10)
    exc, _ = answer[0]
    assert isinstance(exc, InferenceServerException) and exc.status() == "504"
