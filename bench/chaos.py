"""Reliability figures of BENCHMARKS.md (targets.md section 5), measured with real processes.

Usage::

    python bench/chaos.py                    # every scenario: kill -9 + restart of each stage, source, sink; fuzz
    python bench/chaos.py --only stage1 fuzz --json

Kill scenarios: a pipeline of real processes (``python -m quantpipe.runtime.sink``, ``quantpipe stage``
per stage, ``python -m quantpipe.runtime.source``) on 127.0.0.1 streams ``--count`` images; once the
sink has written a quarter of them the target process gets SIGKILL, stays down ``--down`` seconds and is
started again with the same arguments. Figures per scenario:

* ``recovery_s``: restart -> the sink's first new result line (includes the interpreter start and the
  daemon's warm-up: what an operator waits for);
* ``lost`` / ``duplicated``: submitted image ids with no line / with more than one line in the sink's
  output; ``errors``: ids answered with an explicit error line; ``wrong``: results that differ from
  the chained builtin engines (a misrouted or corrupted microbatch).

"Exactly once" when the *source* or the *sink* is killed: the source is the system of record of what
was submitted (ids are deterministic: microbatch ``seq`` holds images ``seq*B ..``), so a restarted
source (``--progress FILE --resume``) submits the stream again from just after the last microbatch
stage 0 handed on, and stage 0 drops by ``seq`` the few it already accepted; the
sink's output file is the system of record of what was answered, so a restarted sink must resume from
it (append, skip ids already written), never truncate it.

Custody scenario (issue 12.1): during a real run a raw DEALER sends the middle stage invalid messages
(truncated, padded, CRC mismatch, unknown clip table) carrying the seqs it holds; every one must be
counted under its kind and nothing lost. End-of-stream scenario (issue 12.2): ``--eos-runs`` short
fault-free streams; after each, every process must exit 0, the stages at once after SIGTERM.

Fuzz scenario: one live stage daemon gets ``--fuzz`` bad messages (see :func:`bad_messages`) from a raw
DEALER, interleaved with a well-behaved source's stream, plus connections that announce a frame above
``zmq.MAXMSGSIZE`` (cut by libzmq before Python sees a byte). Figures: frames sent, rejects counted by
the daemon's Prometheus ``quantpipe_errors_total`` per kind (scraped), rate, and the valid results'
correctness.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from quantpipe import wire
from quantpipe.benchmarks import free_port

__all__ = ["Setup", "Cluster", "free_port", "expected_top5", "check_results", "chaos_stream", "neighbour",
           "bad_messages", "send_oversized", "scrape_errors", "rss_kib", "custody_garbage", "custody_attack",
           "end_of_stream"]

PY = sys.executable


@dataclass
class Setup:
    """A builtin-engine pipeline small enough for two shared cores."""

    engines: tuple[str, ...] = ("builtin:linear", "builtin:linear", "builtin:head:16")
    input_shape: tuple[int, ...] = (8, 16)
    count: int = 480
    rate: float = 80.0
    microbatch: int = 4
    credits: int = 4
    metrics: bool = False
    health: bool = False  # serve /healthz and /readyz from each stage (quantpipe stage --health-port)
    extra: dict[str, Any] = field(default_factory=dict)


class Cluster:
    """The processes of one pipeline on loopback, each restartable with its original arguments.

    Use as a context manager: every process is SIGKILLed and reaped on exit, also after a failure.
    """

    def __init__(self, workdir: Path, setup: Setup) -> None:
        self.dir, self.setup = Path(workdir), setup
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = len(setup.engines)
        self.metrics_ports = [free_port() if setup.metrics else 0 for _ in range(self.n)]
        self.health_ports = [free_port() if setup.health else 0 for _ in range(self.n)]
        self.addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(self.n)]
        self.sink_address = f"tcp://127.0.0.1:{free_port()}"
        self.results = self.dir / "results.jsonl"
        self.config = self.dir / "pipeline.toml"
        self.config.write_text(self._toml())
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def _toml(self) -> str:
        s = self.setup
        pipeline = {"input_shape": list(s.input_shape), "policy": "fixed", "fixed_bits": 32, "target_rate": s.rate,
                    "microbatch": s.microbatch, "credits": s.credits, **s.extra}  # extra may override any key
        lines = ["[pipeline]", *(f"{k} = {json.dumps(v)}" for k, v in pipeline.items())]
        lines += ["[source]", f"count = {s.count}", f"rate = {s.rate}",
                  "[sink]", f'address = "{self.sink_address}"', f'output = "{self.results}"']
        for engine, address, port in zip(s.engines, self.addresses, self.metrics_ports):
            lines += ["[[stages]]", f'engine = "{engine}"', f'address = "{address}"', f"metrics_port = {port}"]
        return "\n".join(lines) + "\n"

    def argv(self, name: str) -> list[str]:
        if name == "sink":
            return [PY, "-m", "quantpipe.runtime.sink", "--config", str(self.config), "--timeout", "120"]
        if name == "source":
            # The same arguments on every start: the first finds no progress file and starts at 0.
            return [PY, "-m", "quantpipe.runtime.source", "--config", str(self.config),
                    "--progress", str(self.dir / "source-progress.json"), "--resume"]
        k = int(name.removeprefix("stage"))
        health = ["--health-port", str(self.health_ports[k])] if self.setup.health else []
        return [PY, "-m", "quantpipe.cli", "stage", "--config", str(self.config), "--stage", str(k),
                "--events", str(self.dir / f"events-{name}.jsonl"), *health]

    def spawn(self, name: str) -> subprocess.Popen:
        self.starts[name] = self.starts.get(name, 0) + 1
        log = (self.dir / f"{name}.log").open("a")
        log.write(f"--- start {self.starts[name]} at {time.time():.3f}\n")
        log.flush()
        p = subprocess.Popen(self.argv(name), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[name] = p
        return p

    def ready_count(self, name: str) -> int:
        path = self.dir / f"events-{name}.jsonl"
        return path.read_text().count('"event": "ready"') if path.exists() else 0

    def wait_ready(self, name: str, starts: int, timeout_s: float = 60.0) -> float:
        """Wait for stage ``name``'s ``starts``-th ready event; returns the time it was seen."""
        deadline = time.monotonic() + timeout_s
        while self.ready_count(name) < starts:
            p = self.procs[name]
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {timeout_s:g} s: {self.log_tail(name)}")
            time.sleep(0.02)
        return time.monotonic()

    def start(self) -> None:
        self.spawn("sink")
        for k in reversed(range(self.n)):
            self.spawn(f"stage{k}")
        for k in range(self.n):
            self.wait_ready(f"stage{k}", 1)
        self.spawn("source")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                p.wait(30)

    def lines(self) -> list[dict[str, Any]]:
        """The sink's output; a torn last line (the sink was killed mid-write) is ignored."""
        if not self.results.exists():
            return []
        out = []
        for line in self.results.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def log_tail(self, name: str, n: int = 8) -> str:
        path = self.dir / f"{name}.log"
        return " | ".join(path.read_text().splitlines()[-n:]) if path.exists() else ""

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a SIGSTOPped process cannot die until continued
                except ProcessLookupError:
                    pass
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ results
def expected_top5(setup: Setup) -> dict[int, list[list[float]]]:
    """What the sink must write for each id: the chained builtin engines over the source's microbatches."""
    from quantpipe.runtime.config import PipelineConfig, SourceConfig, StageConfig
    from quantpipe.runtime.sink import top5
    from quantpipe.runtime.source import load_inputs
    from quantpipe.runtime.stage import load_stage_engine

    cfg = PipelineConfig(stages=tuple(StageConfig(e, f"tcp://127.0.0.1:{1 + i}") for i, e in enumerate(setup.engines)),
                         input_shape=setup.input_shape, source=SourceConfig(count=setup.count))
    pool = load_inputs(cfg).images
    engines = [load_stage_engine(cfg, k) for k in range(len(setup.engines))]
    out: dict[int, list[list[float]]] = {}
    for first in range(0, setup.count, setup.microbatch):
        ids = np.arange(first, min(first + setup.microbatch, setup.count))
        y = np.ascontiguousarray(pool[ids % len(pool)])
        for e in engines:
            y = e.run(y)
        for i, t in zip(ids, top5(y)):
            out[int(i)] = t
    return out


def check_results(lines: list[dict[str, Any]], expected: dict[int, list[list[float]]]) -> dict[str, Any]:
    """Lost, duplicated, erroneous and wrong results against the submitted ids."""
    seen: dict[int, int] = {}
    wrong = 0
    for r in lines:
        i = int(r["id"])
        seen[i] = seen.get(i, 0) + 1
        if "error" not in r and i in expected:
            got, want = r["top5"], expected[i]
            if [c for c, _ in got] != [c for c, _ in want] or not np.allclose([p for _, p in got],
                                                                               [p for _, p in want], atol=1e-5):
                wrong += 1
    lost = [i for i in expected if i not in seen]
    return {"submitted": len(expected), "answered": len(seen), "lost": len(lost), "lost_ids": lost[:20],
            "duplicated": sum(1 for c in seen.values() if c > 1), "unexpected": sum(1 for i in seen if i not in expected),
            "errors": sum(1 for r in lines if "error" in r), "wrong": wrong}


def neighbour(name: str, n_stages: int, side: str) -> str | None:
    """The process ``name`` receives from (``side="upstream"``) or sends to (``"downstream"``)."""
    order = ["source", *(f"stage{k}" for k in range(n_stages)), "sink"]
    i = order.index(name) + (1 if side == "downstream" else -1)
    return order[i] if 0 <= i < len(order) else None


def chaos_stream(workdir: Path, targets: list[tuple[str, str | None]], setup: Setup | None = None, *,
                 down_s: float = 0.5, freeze_s: float = 0.5, resume_timeout_s: float = 15.0,
                 settle_s: float = 20.0, sig: int = signal.SIGKILL) -> dict[str, Any]:
    """Stream once and kill -9 + restart each ``(target, freeze)`` in turn (see the module docstring).

    ``freeze`` names the neighbour frozen with SIGSTOP for ``freeze_s`` just before the kill:

    * ``"downstream"``: the target is blocked on credit, holding microbatches it has accepted (acked
      upstream) but not handed on: the worst moment to die, and one every long stream has.
    * ``"upstream"``: the target has handed on all it accepted; its upstream's window still holds
      unacknowledged microbatches to resend. Measures resend + dedup + restart alone.
    * None: whatever the moment is.

    ``sig`` is the signal that stops the target (SIGTERM: a graceful shutdown, whose exit code and
    duration are recorded). Recovery is restart -> the sink's first result for an image that was not yet inside the pipeline
    when the target died (so results merely drained from downstream queues do not count).
    The next kill waits until the stream has resumed. Returns per-kill and whole-stream figures.
    """
    setup = setup or Setup()
    expected = expected_top5(setup)
    kills: list[dict[str, Any]] = []
    with Cluster(workdir, setup) as c:
        c.start()
        # Images that can be inside the pipeline at once: a window per link, one microbatch per stage.
        capacity = ((c.n + 1) * setup.credits + c.n) * setup.microbatch
        for i, (target, freeze) in enumerate(targets):
            goal = setup.count * (i + 1) // (len(targets) + 2)  # spread the kills over the stream
            deadline = time.monotonic() + 60
            while len(c.lines()) < goal:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the stream stalled before killing {target} ({len(c.lines())}/{goal} "
                                       f"results): sink: {c.log_tail('sink', 3)}")
                time.sleep(0.01)
            frozen = neighbour(target, c.n, freeze) if freeze else None
            if frozen:
                c.kill(frozen, signal.SIGSTOP)
                time.sleep(freeze_s)
            t_signal = time.monotonic()
            c.kill(target, sig)
            stopped_s = time.monotonic() - t_signal
            exit_code = c.procs[target].returncode
            before = {int(r["id"]) for r in c.lines()}
            if frozen:
                c.kill(frozen, signal.SIGCONT)
            time.sleep(down_s)
            t_restart = time.monotonic()
            c.spawn(target)
            t_ready = c.wait_ready(target, c.starts[target]) if target.startswith("stage") else None
            fresh = max(before, default=-1) + capacity
            recovery = None
            while recovery is None and time.monotonic() - t_restart < resume_timeout_s:
                lines = c.lines()
                if any(int(r["id"]) > fresh for r in lines) or (fresh >= setup.count - 1 and len(lines) >= setup.count):
                    recovery = time.monotonic() - t_restart
                time.sleep(0.02)
            kills.append({"target": target, "freeze": freeze,
                          "recovery_s": None if recovery is None else round(recovery, 3),
                          "ready_after_restart_s": None if t_ready is None else round(t_ready - t_restart, 3),
                          "answered_before_kill": len(before), "exit_code": exit_code,
                          "stopped_after_s": round(stopped_s, 3)})
            if recovery is None:
                break  # the stream did not resume: the remaining kills would measure nothing
        end = time.monotonic() + settle_s
        while c.procs["sink"].poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        figures = check_results(c.lines(), expected)
        figures.update(kills=kills, sink_exit=c.procs["sink"].poll())
    return figures


# --------------------------------------------------------------------------------------------- fuzz
def _header(**fields: Any) -> bytes:
    return wire.pack_header(wire.FrameHeader(**fields))


def _with_crc(body60: bytes) -> bytes:
    return body60 + struct.pack("<I", zlib.crc32(body60))


def bad_messages(n: int, seed: int = 0) -> Iterator[tuple[list[bytes], str]]:
    """``n`` invalid messages and the FrameError kind each must be counted under.

    Kinds by construction (each fails exactly one check, in the order the receiver checks):
    malformed/truncated headers, bad magic, wrong version, header CRC, reserved bits, inconsistent
    shapes, oversized payload claims, data without a trace frame, bad trace frames, acks sent
    downstream, wrong frame counts, truncated payloads, payload CRC mismatches, random junk.
    Sequence numbers are far above any valid stream's, so none is mistaken for a duplicate.
    """
    rng = np.random.default_rng(seed)
    trace = wire.pack_trace(time.time())
    payload = np.arange(8, dtype=np.float32).tobytes()

    def data_header(seq: int, **kw: Any) -> bytes:
        base = dict(seq=seq, first_id=0, shape=(1, 8), payload_len=32, stage=wire.SOURCE_STAGE)
        return _header(**{**base, **kw})

    template = data_header(0)

    def valid_header(seq: int) -> bytes:  # the template with this seq: 30x cheaper than packing anew
        return _with_crc(template[:16] + struct.pack("<Q", seq) + template[24:60])

    # Each maker gets the message's seq and a valid data header for it (built once per message).
    makers = [
        ("length", lambda s, h: [h[: int(rng.integers(0, 64))], payload, trace]),  # truncated header
        ("length", lambda s, h: [h + b"\0" * int(rng.integers(1, 64)), payload, trace]),  # padded header
        ("magic", lambda s, h: [b"QPIQ" + h[4:], payload, trace]),
        ("version", lambda s, h: [_with_crc(h[:4] + bytes([wire.VERSION + 1]) + h[5:60]), payload, trace]),
        ("crc", lambda s, h: [h[:16] + struct.pack("<Q", s ^ 1) + h[24:], payload, trace]),  # CRC not updated
        ("malformed", lambda s, h: [_with_crc(h[:15] + b"\x07" + h[16:60]), payload, trace]),  # reserved byte
        ("inconsistent", lambda s, h: [data_header(s, payload_len=31), payload[:31], trace]),
        ("oversized", lambda s, h: [data_header(s, shape=(1 << 28, 8), payload_len=1 << 31), payload, trace]),
        ("malformed", lambda s, h: [h]),  # data without its trace frame
        ("malformed", lambda s, h: [h, payload, trace[:5]]),  # torn trace
        ("malformed", lambda s, h: [h, payload, struct.pack("<d", float("nan"))]),
        ("malformed", lambda s, h: wire.encode_control(wire.MsgType.ACK, seq=s)),  # an ack flowing downstream
        ("malformed", lambda s, h: [h, payload, b"extra", b"frames", trace]),  # wrong frame count
        ("malformed", lambda s, h: [h, payload, b"\0" * 4, trace]),  # a CRC frame without the flag
        ("length", lambda s, h: [h, payload[: int(rng.integers(0, 32))], trace]),  # truncated payload
        ("crc", lambda s, h: [data_header(s, flags=wire.FLAG_PAYLOAD_CRC), payload,
                              struct.pack("<I", zlib.crc32(payload) ^ 0xFFFF), trace]),
        ("length", lambda s, h: [rng.bytes(int(rng.choice([0, 1, 7, 63, 65, 200]))), trace]),  # junk, wrong size
        ("magic", lambda s, h: [b"\0\0\0\0" + rng.bytes(60), trace]),  # 64 bytes of junk
    ]
    for i in range(n):
        kind, make = makers[i % len(makers)]
        seq = (1 << 40) + i
        yield make(seq, valid_header(seq)), kind


def send_oversized(endpoint: str, connections: int, max_message: int) -> int:
    """Open ``connections`` raw ZMTP 3.0 connections that announce one frame larger than ``max_message``
    (the receiver's MAXMSGSIZE) and send its first bytes; returns how many the server hung up on."""
    host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + b"\0" * 31
    ready = b"\x04\x1a\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"
    frame = b"\x02" + struct.pack(">Q", max_message + 1024) + b"\0" * 4096  # long frame, size over the limit
    cut = 0
    for _ in range(connections):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(greeting + ready + frame)
                s.settimeout(5)
                while s.recv(65536):  # the server's greeting and READY, then EOF when it hangs up
                    pass
                cut += 1
            except (ConnectionResetError, BrokenPipeError):
                cut += 1
            except socket.timeout:
                pass
    return cut


def scrape_errors(port: int) -> dict[str, float]:
    """``quantpipe_errors_total`` by kind from a daemon's /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("quantpipe_errors_total{"):
            labels, value = line.rsplit(" ", 1)
            kind = labels.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = out.get(kind, 0.0) + float(value)
    return out


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fuzz_live(workdir: Path, n_bad: int = 100_000, n_oversized: int = 20) -> dict[str, Any]:
    """The fuzz scenario (see the module docstring): returns what was sent, counted and answered."""
    import collections

    import zmq

    from quantpipe.runtime.link import LinkOptions

    setup = Setup(engines=("builtin:head:16",), count=400, rate=100.0, metrics=True)
    expected = expected_top5(setup)
    sent_by_kind = collections.Counter(kind for _, kind in bad_messages(n_bad))
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVHWM, 1)  # the heartbeats the daemon sends back are never read
    raw.setsockopt(zmq.SNDTIMEO, 30_000)
    with Cluster(workdir, setup) as c:
        try:
            c.start()
            port, endpoint = c.metrics_ports[0], c.addresses[0]
            raw.connect(endpoint)
            t0 = time.monotonic()
            cut = 0
            for i, (frames, _) in enumerate(bad_messages(n_bad)):
                raw.send_multipart(frames)  # blocks while the daemon's queue is full: backpressure, not loss
                if i == n_bad // 2:
                    cut = send_oversized(endpoint, n_oversized, LinkOptions().max_message_bytes + wire.HEADER_SIZE)
            sent_s = time.monotonic() - t0
            deadline = time.monotonic() + 60
            while sum(scrape_errors(port).values()) < n_bad and time.monotonic() < deadline:
                if c.procs["stage0"].poll() is not None:
                    break
                time.sleep(0.1)
            counted_s = time.monotonic() - t0
            sink_exit = c.procs["sink"].wait(60)
            time.sleep(0.3)  # a straggler would show up as an extra count
            counted = {k: int(v) for k, v in scrape_errors(port).items()}
            alive = c.procs["stage0"].poll() is None
            log = (Path(workdir) / "stage0.log").read_text()
        finally:
            raw.close(0)
            ctx.term()
        results = check_results(c.lines(), expected)
    log_lines = sum(1 for line in log.splitlines() if "dropped a message" in line)
    return {"bad_sent": n_bad, "sent_by_kind": dict(sent_by_kind), "counted_by_kind": counted,
            "counted": sum(counted.values()), "oversized_connections": n_oversized, "oversized_cut": cut,
            "send_s": round(sent_s, 2), "counted_after_s": round(counted_s, 2),
            "rate_per_s": round(n_bad / counted_s), "daemon_alive": alive, "log_lines": log_lines,
            "valid_images": setup.count, "sink_exit": sink_exit, **{f"valid_{k}": v for k, v in results.items()
                                                                     if k in ("lost", "duplicated", "wrong", "errors")}}


# ----------------------------------------------------------------------------------------- custody
def custody_garbage(seq: int, shape: tuple[int, ...], first_id: int = 0) -> list[tuple[list[bytes], str]]:
    """Bad data messages with well-formed headers and the given ``seq``, and the kind each is counted as:
    a truncated and a padded payload, a payload CRC mismatch, and a reference to a clip table the
    receiver does not hold. Each would steal the microbatch's custody if answered as a duplicate."""
    trace = wire.pack_trace(time.time())
    n = int(np.prod(shape))
    payload = np.zeros(n, dtype=np.float32).tobytes()

    def header(**kw: Any) -> bytes:
        base = dict(seq=seq, first_id=first_id, shape=tuple(shape), payload_len=len(payload), stage=0)
        return wire.pack_header(wire.FrameHeader(**{**base, **kw}))

    table_len = n  # 8-bit codes, one byte each
    return [
        ([header(), payload[:-4], trace], "length"),  # truncated
        ([header(), payload + b"\0" * 4, trace], "length"),  # padded
        ([header(flags=wire.FLAG_PAYLOAD_CRC), payload, struct.pack("<I", zlib.crc32(payload) ^ 1), trace], "crc"),
        ([header(bits=8, range_kind=wire.RangeKind.TABLE, table_digest=0x5EED, payload_len=table_len),
          b"\0" * table_len, trace], "table"),  # a clip table this receiver does not hold
    ]


def custody_attack(workdir: Path, n_bad: int = 20_000, setup: Setup | None = None) -> dict[str, Any]:
    """Issue 12.1: during a real run a raw DEALER sends stage 1 ``n_bad`` invalid messages carrying the
    seqs of the microbatches stage 1 holds at that moment (accepted, not yet handed on). Only a frame
    that would be accepted may move custody: every one must be counted under its kind and nothing lost."""
    import collections

    import zmq

    # Stage 1 is slower than the offered rate, so it always holds a full window of accepted microbatches.
    setup = setup or Setup(engines=("builtin:linear", "builtin:sleep:25", "builtin:head:16"), count=1200, rate=200.0,
                           metrics=True)
    expected = expected_top5(setup)
    sent: collections.Counter[str] = collections.Counter()
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVHWM, 1)  # whatever comes back is never read
    raw.setsockopt(zmq.SNDTIMEO, 5_000)
    with Cluster(workdir, setup) as c:
        try:
            c.start()
            raw.connect(c.addresses[1])
            port = c.metrics_ports[1]
            t0 = time.monotonic()
            while not c.lines() and time.monotonic() - t0 < 60:
                time.sleep(0.01)  # the stream is flowing: the seqs aimed at are really held from now on
            while sum(sent.values()) < n_bad and c.procs["sink"].poll() is None and time.monotonic() - t0 < 120:
                front = len(c.lines()) // setup.microbatch  # the next seq the sink waits for: stage 1 holds it
                for seq in range(max(0, front - 1), front + setup.credits + 3):
                    shape = (setup.microbatch, *setup.input_shape)
                    for frames, kind in custody_garbage(seq, shape, seq * setup.microbatch):
                        raw.send_multipart(frames)
                        sent[kind] += 1
                time.sleep(0.005)  # spread over the stream
            sink_exit = c.procs["sink"].wait(60)
            deadline = time.monotonic() + 10
            while sum(scrape_errors(port).values()) < sum(sent.values()) and time.monotonic() < deadline:
                time.sleep(0.1)
            counted = {k: int(v) for k, v in scrape_errors(port).items()}
        except (subprocess.TimeoutExpired, zmq.ZMQError):
            sink_exit, counted = None, {}
        finally:
            raw.close(0)
            ctx.term()
        results = check_results(c.lines(), expected)
    return {"bad_sent": sum(sent.values()), "sent_by_kind": dict(sent), "counted_by_kind": counted,
            "sink_exit": sink_exit, **{k: results[k] for k in ("submitted", "answered", "lost", "duplicated", "wrong")}}


# ------------------------------------------------------------------------------------- end of stream
def end_of_stream(workdir: Path, runs: int = 20, setup: Setup | None = None) -> dict[str, Any]:
    """Issue 12.2: ``runs`` short, fault-free streams; after each the sink exits by itself and every
    stage gets SIGTERM. A stream that ended well must end every process with exit 0 at once (no stage
    waiting its 10 s drain for a lost final ACK/DONE). Figures: failures and the slowest stage stop."""
    setup = setup or Setup(engines=("builtin:linear", "builtin:head:16"), count=48, rate=400.0)
    stops, failures = [], []
    for i in range(runs):
        with Cluster(Path(workdir) / f"run{i}", setup) as c:
            c.start()
            sink_exit = c.procs["sink"].wait(60)
            source_exit = c.procs["source"].wait(30)
            codes = {"sink": sink_exit, "source": source_exit}
            slowest = 0.0
            for k in range(c.n):
                t = time.monotonic()
                c.kill(f"stage{k}", signal.SIGTERM)
                slowest = max(slowest, time.monotonic() - t)
                codes[f"stage{k}"] = c.procs[f"stage{k}"].returncode
            stops.append(slowest)
            lost = check_results(c.lines(), expected_top5(setup))["lost"] if i == 0 else None
            if any(code != 0 for code in codes.values()) or lost:
                failures.append({"run": i, "codes": codes, "lost": lost,
                                 "logs": {n: c.log_tail(n, 1)[-200:] for n, code in codes.items() if code != 0}})
    return {"runs": runs, "failed": len(failures), "failures": failures[:5],
            "stage_stop_s_max": round(max(stops), 3), "stage_stop_s_median": round(sorted(stops)[len(stops) // 2], 3)}


# --------------------------------------------------------------------------------------------- main
_SCENARIOS = {
    # name: (targets, setup, signal)
    "stages": ([("source", None), ("stage1", "upstream"), ("stage0", "upstream"), ("stage2", "upstream")],
               dict(count=1200, rate=200.0), signal.SIGKILL),
    "busy": ([("stage1", "downstream")], dict(count=800, rate=200.0), signal.SIGKILL),
    "sink": ([("sink", None)], dict(count=600, rate=200.0), signal.SIGKILL),
    "sigterm": ([("stage1", None), ("stage0", None)], dict(count=600, rate=200.0), signal.SIGTERM),
}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[*_SCENARIOS, "fuzz", "custody", "eos"],
                        help="scenarios to run (default all)")
    parser.add_argument("--custody", type=int, default=20_000, help="forged duplicates in the custody scenario")
    parser.add_argument("--eos-runs", type=int, default=20, help="short streams in the end-of-stream scenario")
    parser.add_argument("--fuzz", type=int, default=100_000, help="bad messages in the fuzz scenario")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--keep", help="keep the run directories here (logs, results) instead of a temp dir")
    args = parser.parse_args(argv)
    names = args.only or [*_SCENARIOS, "fuzz", "custody", "eos"]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        for name in names:
            t0 = time.monotonic()
            if name == "fuzz":
                report[name] = fuzz_live(base / name, args.fuzz)
            elif name == "custody":
                report[name] = custody_attack(base / name, args.custody)
            elif name == "eos":
                report[name] = end_of_stream(base / name, args.eos_runs)
            else:
                targets, kw, sig = _SCENARIOS[name]
                report[name] = chaos_stream(base / name, targets, Setup(**kw), sig=sig, resume_timeout_s=10.0,
                                            settle_s=5.0)
            report[name]["wall_s"] = round(time.monotonic() - t0, 1)
            if not args.json:
                _print(name, report[name])
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _print(name: str, r: dict[str, Any]) -> None:
    if name == "custody":
        print(f"custody: {r['bad_sent']} forged duplicates of held seqs ({r['sent_by_kind']}); counted "
              f"{r['counted_by_kind']}; {r['submitted']} images: answered {r['answered']}, lost {r['lost']}, "
              f"duplicated {r['duplicated']}, wrong {r['wrong']}, sink exit {r['sink_exit']}")
        return
    if name == "eos":
        print(f"end of stream: {r['runs']} runs, {r['failed']} with a non-zero exit; stage stop after SIGTERM: "
              f"median {r['stage_stop_s_median']} s, max {r['stage_stop_s_max']} s")
        return
    if name == "fuzz":
        print(f"fuzz: {r['bad_sent']} bad messages + {r['oversized_connections']} oversized connections; "
              f"counted {r['counted']} ({r['counted_by_kind']}), cut by the socket {r['oversized_cut']}; "
              f"{r['rate_per_s']}/s; daemon alive: {r['daemon_alive']}; {r['log_lines']} log lines; valid "
              f"{r['valid_images']} images: lost {r['valid_lost']}, duplicated {r['valid_duplicated']}, "
              f"wrong {r['valid_wrong']}, errors {r['valid_errors']}")
        return
    print(f"{name}: {r['submitted']} images, answered {r['answered']}, lost {r['lost']}, duplicated "
          f"{r['duplicated']}, wrong {r['wrong']}, errors {r['errors']}, sink exit {r['sink_exit']}")
    for k in r["kills"]:
        rec = "did not resume" if k["recovery_s"] is None else f"resumed {k['recovery_s']:.2f} s after restart"
        ready = "" if k["ready_after_restart_s"] is None else f" (ready after {k['ready_after_restart_s']:.2f} s)"
        print(f"  {k['target']:<7} ({k['freeze'] or 'no'} neighbour frozen, exit {k['exit_code']}): {rec}{ready}")


if __name__ == "__main__":
    sys.exit(main())
