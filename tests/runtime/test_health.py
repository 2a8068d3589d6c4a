"""/healthz and /readyz over real HTTP: status codes and JSON bodies; a stage whose loop hangs turns
unhealthy within the stale time and healthy again when it resumes; readiness follows the links."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from quantpipe.runtime.config import PipelineConfig, SinkConfig, SourceConfig, StageConfig
from quantpipe.runtime.health import Health, HealthServer, stage_facts
from quantpipe.runtime.sink import Sink
from quantpipe.runtime.source import Source, load_inputs
from quantpipe.runtime.stage import StageDaemon


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            assert r.headers["Content-Type"] == "application/json"
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def served():
    clock = _Clock()
    health = Health(required=("engine", "downstream"), stale_after_s=2.0, clock=clock)
    server = HealthServer(health, 0).start()
    yield health, server.port, clock
    server.stop()


def test_status_codes_follow_the_loop_and_the_facts(served):
    health, port, clock = served
    assert _get(port, "/healthz") == (503, {"status": "starting", "uptime_s": 0.0})
    health.beat(engine=True)
    code, body = _get(port, "/healthz")
    assert code == 200 and body["status"] == "ok" and body["loop_age_s"] == 0.0
    code, body = _get(port, "/readyz")
    assert code == 503 and body["missing"] == ["downstream"] and body["facts"] == {"engine": True}
    health.beat(downstream=True)  # facts accumulate across beats
    code, body = _get(port, "/readyz")
    assert code == 200 and body["status"] == "ready" and "missing" not in body
    clock.t += 2.5  # the loop stops ticking: hung
    assert _get(port, "/healthz")[0] == 503 and _get(port, "/healthz")[1]["status"] == "stalled"
    assert _get(port, "/readyz")[0] == 503  # a hung daemon is never ready
    health.beat(downstream=False)
    assert _get(port, "/healthz")[0] == 200
    code, body = _get(port, "/readyz?verbose=1")
    assert code == 503 and body["missing"] == ["downstream"]
    assert _get(port, "/metrics")[0] == 404


def test_port_in_use_is_a_user_error():
    from quantpipe.errors import QuantpipeError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(QuantpipeError, match="choose a free port"):
            HealthServer(Health(), s.getsockname()[1]).start()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _BeatingStage(StageDaemon):
    """StageDaemon with the proposed wiring (beat in the loop and while waiting for credit)."""

    health: Health

    def _after_link_activity(self) -> None:
        super()._after_link_activity()
        self.health.beat(**stage_facts(self))

    def _idle(self) -> None:
        super()._idle()
        self.health.beat(**stage_facts(self))


def test_a_hung_stage_turns_unhealthy_and_recovers():
    cfg = PipelineConfig(stages=(StageConfig("builtin:identity", f"tcp://127.0.0.1:{_port()}"),),
                         sink=SinkConfig(address=f"tcp://127.0.0.1:{_port()}"), input_shape=(4, 8), policy="fixed",
                         target_rate=200.0, microbatch=2, source=SourceConfig(count=40))
    stage = _BeatingStage(cfg, 0)
    stage.health = Health(required=("engine", "upstream", "downstream"), stale_after_s=0.6)
    server = HealthServer(stage.health, 0).start()
    release = threading.Event()
    run = stage.engine.run
    calls = [0]

    def engine(x):
        calls[0] += 1
        if calls[0] == 10:
            release.wait(10)  # the 10th microbatch hangs the loop (a stuck device call)
        return run(x)

    stage.engine.run = engine
    sink = Sink(cfg, 40, io.StringIO())
    source = Source(cfg, load_inputs(cfg))
    threads = [threading.Thread(target=stage.serve, kwargs={"drain_timeout_s": 2.0}, daemon=True),
               threading.Thread(target=sink.serve, kwargs={"timeout_s": 20.0}, daemon=True),
               threading.Thread(target=source.serve, kwargs={"drain_timeout_s": 10.0}, daemon=True)]
    try:
        time.sleep(0.3)
        code, body = _get(server.port, "/readyz")
        assert code == 503 and set(body["missing"]) >= {"upstream"}  # no source yet
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while _get(server.port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        while calls[0] < 10:
            assert time.monotonic() < deadline, "the stream did not reach the hang"
            time.sleep(0.02)
        time.sleep(0.9)  # > stale_after_s
        code, body = _get(server.port, "/healthz")
        assert code == 503 and body["status"] == "stalled"
        release.set()
        time.sleep(0.2)
        assert _get(server.port, "/healthz")[0] == 200
        threads[1].join(20)
        assert sink.written == 40
    finally:
        release.set()
        source.stop()
        stage.stop()
        sink.stop()
        for t in threads:
            if t.is_alive() or t.ident:
                t.join(10)
        sink.close(0)
        server.stop()


def _status(port: int, path: str) -> tuple[int, dict]:
    try:
        return _get(port, path)
    except (urllib.error.URLError, ConnectionError):
        return 0, {}  # not serving (yet)


@pytest.mark.slow
def test_stage_processes_serve_health_and_detect_a_hung_peer(tmp_path):
    """Real `quantpipe stage` processes: ready while the stream flows; when the sink hangs (SIGSTOP) the
    last stage's heartbeats go unanswered and /readyz names the downstream within a few heartbeat
    intervals, while /healthz stays 200 (blocked on credit is not hung); thawed, ready again."""
    import signal

    from bench.chaos import Cluster, Setup

    setup = Setup(engines=("builtin:linear", "builtin:head:16"), count=3000, rate=200.0, health=True)
    with Cluster(tmp_path, setup) as c:
        c.start()
        last = c.health_ports[1]
        deadline = time.monotonic() + 20
        while any(_status(p, "/readyz")[0] != 200 for p in c.health_ports):
            assert time.monotonic() < deadline, [_status(p, "/readyz") for p in c.health_ports]
            time.sleep(0.1)
        c.kill("sink", signal.SIGSTOP)
        t_stop = time.monotonic()
        while _status(last, "/readyz")[0] == 200:
            assert time.monotonic() - t_stop < 10, "a hung sink was never noticed"
            time.sleep(0.05)
        detected_s = time.monotonic() - t_stop
        code, body = _status(last, "/readyz")
        assert code == 503 and body["missing"] == ["downstream"], body
        assert _status(last, "/healthz")[0] == 200  # alive, only waiting
        c.kill("sink", signal.SIGCONT)
        deadline = time.monotonic() + 10
        while _status(last, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, _status(last, "/readyz")
            time.sleep(0.05)
    print(f"\nhung sink noticed after {detected_s:.2f} s")
    assert detected_s < 5.0  # peer_timeout_s (3 s) plus a heartbeat interval or two
