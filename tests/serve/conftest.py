"""Fixtures for the serving tests: builtin pipelines on random loopback ports, stage daemons in threads
or processes, and a `quantpipe serve` Server on its own event loop in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("tritonclient.http")

from quantpipe.benchmarks import free_port  # noqa: E402 - never the same port twice in a process
from quantpipe.benchmarks import wait_http_ready  # noqa: E402,F401 - the serve tests import it from here
from quantpipe.runtime.config import PipelineConfig, load_config  # noqa: E402
from quantpipe.runtime.stage import StageDaemon  # noqa: E402


def write_config(tmp_path: Path, engines: list[str], input_shape=(3, 32, 32), microbatch: int = 4,
                 credits: int = 4, name: str = "pipeline.toml") -> Path:
    """A builtin pipeline TOML on free loopback ports (stages at 32 bits: exact results)."""
    lines = ["[pipeline]", f"input_shape = {list(input_shape)}", 'policy = "fixed"', "fixed_bits = 32",
             "target_rate = 1000.0", f"microbatch = {microbatch}", f"credits = {credits}", ""]
    lines += ["[sink]", f'address = "tcp://127.0.0.1:{free_port()}"', ""]
    for e in engines:
        lines += ["[[stages]]", f'engine = "{e}"', f'address = "tcp://127.0.0.1:{free_port()}"', ""]
    path = tmp_path / name
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def stages_in_threads(cfg: PipelineConfig):
    daemons = [StageDaemon(cfg, k) for k in range(len(cfg.stages))]
    threads = [threading.Thread(target=d.serve, kwargs={"drain_timeout_s": 1.0}, daemon=True) for d in daemons]
    for t in threads:
        t.start()
    try:
        yield daemons
    finally:
        for d in daemons:
            d.stop()
        for t in threads:
            t.join(10)


def start_stage_process(config: Path, k: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "quantpipe.cli", "stage", "--config", str(config), "--stage", str(k)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def serve_cli(config: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """``quantpipe serve --config CONFIG ARGS...`` run to its end (for flags it must refuse), output captured."""
    return subprocess.run([sys.executable, "-m", "quantpipe.cli", "serve", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout_s)


class ServerThread:
    """A quantpipe.serve Server running on its own event loop in a daemon thread."""

    def __init__(self, cfg: PipelineConfig, **kw) -> None:
        from quantpipe.serve.command import Server

        kw.setdefault("http", ("127.0.0.1", 0))
        kw.setdefault("access_log_per_s", 0)
        self.server = Server(cfg, **kw)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            try:  # as serve_forever does: nothing half-started is left behind
                self.loop.run_until_complete(self.server.stop())
            finally:
                self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop())
        self.loop.close()

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        if not self._started.wait(120):  # longer than the front workers' 60 s start timeout
            raise TimeoutError("the server did not start within 120 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(15)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.server.service.ready():
            if time.monotonic() > deadline:
                raise TimeoutError("the pipeline did not become ready")
            time.sleep(0.05)


@pytest.fixture
def builtin_pipeline(tmp_path):
    """identity -> head:1000 on [3, 32, 32] images, stages in threads, a server with HTTP and gRPC."""
    path = write_config(tmp_path, ["builtin:identity", "builtin:head:1000"])
    cfg = load_config(path)
    with stages_in_threads(cfg), ServerThread(cfg, grpc=("127.0.0.1", 0)) as srv:
        srv.wait_ready()
        yield cfg, srv
