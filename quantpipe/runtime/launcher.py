"""``quantpipe run``: start a whole pipeline on this machine and stream images through it.

Starts the sink, every stage (``quantpipe stage``) and the source as separate processes, waits for
the stages to be ready, streams ``count`` images, prints a live one-line status, and at the end a
summary; it writes into ``--out`` (default ``runs/<time>``):

* ``config.json``: the resolved config every process ran with (flags applied),
* ``results.jsonl`` (sink), ``labels.jsonl`` (source), ``events-stage<K>.jsonl`` (policy windows),
* ``logs/<process>.log``, ``timeline.csv`` and ``timeline.png`` (:mod:`quantpipe.runtime.timeline`),
* ``summary.json``.

Bandwidth schedules (``--bandwidth-schedule 0:500,20:50,40:250``, Mbit/s on the stage-to-stage links):

* ``--shaping emulate`` (default): each stage's sender holds every frame as long as a link of the
  scheduled rate would take to carry it (:mod:`quantpipe.runtime.shaping`); no privileges needed.
* ``--shaping netns``: real shaping. Needs root. The launcher builds a chain of network namespaces
  joined by veth pairs with ``tools/netlinks.sh`` (stage k in namespace k, link k shaped by tc tbf),
  rewrites the stages' addresses to the namespaces' (ports kept), runs every process with
  ``ip netns exec``, changes the tbf rate on schedule, and removes the namespaces at the end.

Stopping: Ctrl-C, SIGTERM and SIGHUP all stop the run the same way (every child gets SIGTERM and
drains, what is left after the grace time gets SIGKILL, the namespaces are removed), and the exit
code says so. On Linux every child also asks the kernel for SIGKILL when the launcher dies
(``PR_SET_PDEATHSIG``), so even ``kill -9`` of the launcher leaves no stage holding its port; with
``netns`` shaping a small guard process, told the same way, removes the namespaces then. A run
whose sink got every result still fails (exit 1) if any process exited non-zero, naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantpipe.errors import ConfigError, QuantpipeError
from quantpipe.runtime import timeline
from quantpipe.runtime.config import PipelineConfig, load_config
from quantpipe.runtime.stage import add_overrides, overrides_from

__all__ = ["Pipeline", "add_arguments", "run", "NETLINKS", "Stopped", "die_with_parent"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class Stopped(KeyboardInterrupt):
    """The launcher got SIGTERM or SIGHUP: stop like Ctrl-C (a KeyboardInterrupt to every caller)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _prctl() -> Any:
    """libc's ``prctl`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _arm(prctl: Any, sig: int, parent: int) -> None:
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call: nobody would signal us
        os._exit(1)


def _die_with_parent(sig: int = signal.SIGKILL) -> Any:
    """A ``preexec_fn`` that makes the child get ``sig`` when the launcher dies (Linux), or None.

    libc is loaded here, in the parent: the child, between fork and exec, only makes the call."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _arm(prctl, sig, parent)

    return preexec


def die_with_parent(sig: int, parent: int) -> None:
    """In a child started without a ``preexec_fn`` (multiprocessing's spawn): get ``sig`` when ``parent``
    dies (Linux), and exit at once if it already has."""
    _arm(_prctl(), sig, parent)


# Removes the run's namespaces when the launcher dies without its cleanup (kill -9): it gets SIGTERM
# from the kernel then (PR_SET_PDEATHSIG), runs `netlinks.sh down N` and exits.
_NETNS_GUARD = """
import os, signal, subprocess, sys
netlinks, prefix, n = sys.argv[1:4]
def down(*_):
    subprocess.run(["bash", netlinks, "down", n], env={**os.environ, "QP_NS_PREFIX": prefix}, capture_output=True)
    os._exit(0)
signal.signal(signal.SIGTERM, down)
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    signal.pause()
"""

NETLINKS = Path(__file__).resolve().parents[2] / "tools" / "netlinks.sh"


def _port(address: str) -> str:
    return address.rsplit(":", 1)[1]


class Pipeline:
    """The processes of one pipeline run and the files they write.

    Args:
        cfg: resolved config.
        out: output directory.
        ns_prefix: namespace name prefix for ``netns`` shaping (default ``$QP_NS_PREFIX``, else one
            derived from the process id, so concurrent runs do not collide).
    """

    def __init__(self, cfg: PipelineConfig, out: Path, *, ns_prefix: str = "") -> None:
        self.out = out
        self.ns_prefix = ns_prefix or os.environ.get("QP_NS_PREFIX") or f"qp{os.getpid() % 100000}"
        self.netns = cfg.shaping == "netns" and cfg.schedule is not None
        self.namespaces: list[str] = []
        if self.netns:
            cfg = self._namespaced(cfg)
        # The sink writes into this run's directory: say so in the config every process logs and
        # config.json records, rather than the path the TOML named.
        cfg = dataclasses.replace(cfg, sink=dataclasses.replace(cfg.sink, output=str(out / "results.jsonl")))
        self.cfg = cfg
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Any] = {}
        self.t0 = 0.0
        self._applied_step = -1
        self.exit_codes: dict[str, int] = {}
        self._preexec = _die_with_parent()
        self._guard: subprocess.Popen | None = None

    # -- network namespaces ------------------------------------------------------------------------
    def _namespaced(self, cfg: PipelineConfig) -> PipelineConfig:
        n = len(cfg.stages)
        self.namespaces = [f"{self.ns_prefix}n{k}" for k in range(n)]
        stages = []
        for k, s in enumerate(cfg.stages):
            # Stage 0 is fed by the source inside its own namespace; stage k > 0 listens on link k-1.
            host = "127.0.0.1" if k == 0 else f"10.77.{k - 1}.2"
            stages.append(dataclasses.replace(s, address=f"tcp://{host}:{_port(s.address)}", namespace=self.namespaces[k]))
        sink = dataclasses.replace(cfg.sink, address=f"tcp://127.0.0.1:{_port(cfg.sink.address)}",
                                   namespace=self.namespaces[-1])
        return cfg.replace(stages=tuple(stages), sink=sink, shaping="netns")

    def _netlinks(self, *args: str) -> None:
        env = {**os.environ, "QP_NS_PREFIX": self.ns_prefix}
        done = subprocess.run(["bash", str(NETLINKS), *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise QuantpipeError(f"tools/netlinks.sh {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}"
                                 " (netns shaping needs root, iproute2 and tc; use --shaping emulate otherwise)")

    def _apply_schedule(self, now: float) -> None:
        sched = self.cfg.schedule
        if not self.netns or sched is None:
            return
        idx = max(i for i, (t, _) in enumerate(sched.steps) if now - self.t0 >= t) if now >= self.t0 else 0
        if idx != self._applied_step:
            rate = sched.steps[idx][1]
            for link in range(len(self.cfg.stages) - 1):
                self._netlinks("rate", str(len(self.cfg.stages)), str(link), f"{rate:g}", str(self.cfg.burst_bytes))
            self._applied_step = idx

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], namespace: str = "") -> None:
        if namespace:
            argv = ["ip", "netns", "exec", namespace, *argv]
        log_file = (self.out / "logs" / f"{name}.log").open("w")
        self.logs[name] = log_file
        self.procs[name] = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            preexec_fn=self._preexec)

    def start(self, ready_timeout_s: float = 180.0) -> None:
        """Write the config, build namespaces, start sink and stages, wait for readiness, start the source."""
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        for f in self.out.glob("events-stage*.jsonl"):
            f.unlink()
        (self.out / "results.jsonl").unlink(missing_ok=True)  # the sink resumes an existing file
        config = self.out / "config.json"
        config.write_text(json.dumps(self.cfg.to_document(), indent=2))
        py = [sys.executable, "-m"]
        if self.netns:
            guard = _die_with_parent(signal.SIGTERM)
            if guard is not None:  # first the guard, then the namespaces it guards
                self._guard = subprocess.Popen([sys.executable, "-c", _NETNS_GUARD, str(NETLINKS), self.ns_prefix,
                                                str(len(self.cfg.stages))], preexec_fn=guard,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            self._netlinks("up", str(len(self.cfg.stages)), f"{self.cfg.schedule.rate_at(0):g}", str(self.cfg.burst_bytes))
            self._applied_step = 0
        self._spawn("sink", [*py, "quantpipe.runtime.sink", "--config", str(config), "--output",
                             str(self.out / "results.jsonl"), "--timeout", "300"], self.cfg.sink.namespace)
        for k in reversed(range(len(self.cfg.stages))):
            self._spawn(f"stage{k}", [*py, "quantpipe.cli", "stage", "--config", str(config), "--stage", str(k),
                                      "--events", str(self.out / f"events-stage{k}.jsonl")],
                        self.cfg.stages[k].namespace)
        deadline = time.monotonic() + ready_timeout_s
        while not all(any(e.get("event") == "ready" for e in timeline.read_jsonl(self.out / f"events-stage{k}.jsonl"))
                      for k in range(len(self.cfg.stages))):
            self._check_alive()
            if time.monotonic() > deadline:
                raise QuantpipeError(f"stages not ready after {ready_timeout_s:g} s; see {self.out / 'logs'}")
            time.sleep(0.1)
        started = self.out / "source-started.json"
        started.unlink(missing_ok=True)
        self._spawn("source", [*py, "quantpipe.runtime.source", "--config", str(config),
                               "--labels", str(self.out / "labels.jsonl"), "--started", str(started)],
                    self.cfg.stages[0].namespace)
        while not started.is_file():  # t = 0 is the first microbatch, not the source's interpreter start
            self._check_alive()
            if self.procs["source"].poll() is not None:
                raise QuantpipeError(f"the source exited with code {self.procs['source'].returncode}; "
                                     f"see {self.out / 'logs' / 'source.log'}")
            if time.monotonic() > deadline + 120:
                raise QuantpipeError(f"the source did not start; see {self.out / 'logs' / 'source.log'}")
            time.sleep(0.02)
        self.t0 = json.loads(started.read_text())["t"]

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if name != "source" and p.poll() is not None:
                tail = (self.out / "logs" / f"{name}.log").read_text().strip().splitlines()[-5:]
                raise QuantpipeError(f"{name} exited with code {p.returncode}:\n  " + "\n  ".join(tail))

    def wait(self, timeout_s: float, status: bool = True) -> int:
        """Follow the run until the sink has every result; print the status line. Returns the sink's code."""
        deadline = time.monotonic() + timeout_s
        tty = sys.stderr.isatty()
        last_print = 0.0
        while self.procs["sink"].poll() is None:
            now = time.time()
            self._apply_schedule(now)
            self._check_alive()
            if time.monotonic() > deadline:
                raise QuantpipeError(f"the run did not finish within {timeout_s:g} s; see {self.out / 'logs'}")
            if status and (tty or now - last_print >= 5.0):
                line = self.status_line(now)
                print(("\r" + line.ljust(110)) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
                last_print = now
            time.sleep(0.25)
        if status and tty:
            print(file=sys.stderr)
        return self.procs["sink"].returncode

    def status_line(self, now: float) -> str:
        results = timeline.read_jsonl(self.out / "results.jsonl")
        recent = sum(1 for r in results if r.get("t", 0) >= now - 2.0) / 2.0
        parts = [f"t={now - self.t0:6.1f}s", f"images {len(results)}/{self.cfg.source.count}", f"{recent:6.1f} img/s"]
        for k in range(len(self.cfg.stages) - 1):
            w = [e for e in timeline.read_jsonl(self.out / f"events-stage{k}.jsonl") if e.get("event") == "window"]
            if w:
                parts.append(f"s{k}: {w[-1]['next_bits']:>2} bit @ {w[-1]['bandwidth_Bps'] * 8e-6:7.1f} Mbit/s")
        if self.cfg.schedule is not None:
            parts.append(f"link {self.cfg.schedule.rate_at(now - self.t0):g} Mbit/s")
        return "  ".join(parts)

    def stop(self, grace_s: float = 15.0) -> dict[str, int]:
        """SIGTERM every process (stages drain), SIGKILL what is left after ``grace_s``; remove namespaces.

        Returns every process's exit code (also kept in :attr:`exit_codes`)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit after SIGTERM; killing it", name)
                p.kill()
                p.wait()
            self.exit_codes[name] = p.returncode
        for f in self.logs.values():
            f.close()
        if self.netns:
            try:
                self._netlinks("down", str(len(self.cfg.stages)))
            except QuantpipeError as exc:
                log.error("%s", exc)
        if self._guard is not None and self._guard.poll() is None:
            self._guard.kill()  # the namespaces are gone already
            self._guard.wait()
        return self.exit_codes

    def _floors(self, events: list[dict[str, Any]]) -> list[float] | None:
        """Per schedule step, the output rate to be back to: R, or what the link carries at the narrowest
        bitwidth when that is less (from the boundary size the stage reported)."""
        sched = self.cfg.schedule
        sized = [e for e in events if e.get("event") == "window" and e.get("images")]
        if sched is None or not sized:
            return None
        w = sized[0]  # the stage's window record: wire bytes (headers included) at w["bits"]
        fp32_per_image = w["bytes"] / w["images"] * 32 / w["bits"]
        narrowest = (self.cfg.fixed_bits if self.cfg.policy == "fixed" and self.cfg.fixed_bits
                     else min(self.cfg.allowed_bits(tuple(b for b in self.cfg.bits if b != 32))))
        per_image = fp32_per_image * narrowest / 32
        return [min(self.cfg.target_rate, rate * 1e6 / 8 / per_image) for _, rate in sched.steps]

    def failed_processes(self) -> list[str]:
        """``"stage1 exited with code 1 (see logs/stage1.log)"`` for every process that did not exit 0."""
        return [f"{name} exited with code {code} (see {self.out / 'logs' / (name + '.log')})"
                for name, code in self.exit_codes.items() if code != 0]

    def report(self) -> dict[str, Any]:
        """Write timeline.csv/png and summary.json; return the summary."""
        results = timeline.read_jsonl(self.out / "results.jsonl")
        elapsed = max(1e-9, max([r.get("t", 0) for r in results] + [self.t0]) - self.t0)
        summ = timeline.summary(self.out, self.t0, elapsed)
        sched = self.cfg.schedule
        rows = timeline.build(self.out, self.t0, sched)
        summ["timeline_csv"] = str(timeline.write_csv(rows, self.out / "timeline.csv"))
        try:
            summ["timeline_png"] = str(timeline.plot(rows, self.out / "timeline.png", target_rate=self.cfg.target_rate))
        except ImportError:
            summ["timeline_png"] = None  # matplotlib is an optional extra ('quantpipe[calib]')
        if len(self.cfg.stages) > 1:
            events = timeline.read_jsonl(self.out / "events-stage0.jsonl")
            steps = [t for t, _ in sched.steps] if sched else [0.0]
            summ["adaptation"] = timeline.adaptation(
                events, steps, self.t0, results=results, target_rate=self.cfg.target_rate,
                floors=self._floors(events), window_s=self.cfg.window * self.cfg.microbatch / self.cfg.target_rate,
                microbatch=self.cfg.microbatch)
        (self.out / "summary.json").write_text(json.dumps(summ, indent=2))
        return summ


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline TOML file (see quantpipe.runtime.config)")
    parser.add_argument("--images", help="image folder to stream (overrides source.images)")
    parser.add_argument("--count", type=int, help="images to stream (overrides source.count)")
    parser.add_argument("--rate", type=float, help="images/s offered by the source (default: target rate)")
    parser.add_argument("--offset", type=int, help="skip this many images of every class (the calibration images)")
    parser.add_argument("--out", help="output directory (default runs/<time>)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from(args)
    overrides.update({"source.images": args.images, "source.count": args.count, "source.rate": args.rate,
                      "source.offset": args.offset})
    cfg = load_config(args.config, overrides)
    if cfg.shaping == "netns" and os.geteuid() != 0:
        raise ConfigError("--shaping netns needs root (network namespaces and tc); use --shaping emulate")
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    pipeline = Pipeline(cfg, out)
    log.info("quantpipe run: %d stage(s), %d image(s), output in %s; config %s", len(cfg.stages), cfg.source.count,
             out, json.dumps(pipeline.cfg.to_dict(), sort_keys=True))
    stopping = []

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping:  # a second signal while the children are being stopped must not cut that short
            stopping.append(signum)
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            pipeline.start()
            code = pipeline.wait(args.timeout)
        finally:
            stopping.append(0)
            pipeline.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summ = pipeline.report()
    print(format_summary(summ))
    failed = pipeline.failed_processes()
    for line in failed:
        print(f"quantpipe run: {line}", file=sys.stderr)
    return 0 if code == 0 and summ["images"] == cfg.source.count and not failed else 1


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"images {s['images']} ({s['errors']} errors) in {s['elapsed_s']:.1f} s: {s['output_rate']:.1f} img/s; "
             f"latency p50 {s['latency_ms_p50']:.1f} ms, p95 {s['latency_ms_p95']:.1f} ms"
             + (f"; top-1 {100 * s['top1']:.1f} %" if s.get("top1") is not None else "")
             + ("" if s["in_order"] else "; RESULTS OUT OF ORDER")]
    for a in s.get("adaptation", []):
        if a.get("settle_s") is None and "floor_rate" in a:
            back = f"output never back to {a['floor_rate']:g} img/s"
        elif "floor_rate" in a:
            back = (f"output back to {a['floor_rate']:g} img/s (-10 %) after {a['settle_s']:.2f} s "
                    f"({a['settled_after_windows']} window(s)), {a['changes_after_settling']} bitwidth change(s) after")
        else:
            back = "output rate not measured"
        lines.append(f"  from t={a['step_s']:g}s: {back}; bits {a['decisions']} -> {a['bits']}")
    lines.append(f"timeline: {s['timeline_csv']}" + (f", plot: {s['timeline_png']}" if s.get("timeline_png") else ""))
    return "\n".join(lines)
