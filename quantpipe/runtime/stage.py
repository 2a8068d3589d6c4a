"""``quantpipe stage``: the stage daemon, one per device.

The data path (:meth:`StageDaemon.process`) reads top to bottom: receive a frame, decode it with the
clip table, run the engine, choose the bitwidth, encode, send. Frames are read, validated and
acknowledged on arrival by a receiving thread (:mod:`quantpipe.runtime.inbox`), so that the
upstream's bandwidth measurement sees the link and not this stage's compute. Around the data path the
daemon only keeps its two links alive (:mod:`quantpipe.runtime.link`: acks, credits, resends, heartbeats), closes a bandwidth
window every N acknowledged microbatches and asks the policy for the next bitwidth
(:mod:`quantpipe.runtime.policy`), applies an emulated bandwidth schedule if configured, and exports
Prometheus metrics (:mod:`quantpipe.runtime.metrics`).

Stage k's output is boundary k; it is quantized only when another stage follows (the last stage
sends float32 logits to the sink). SIGTERM (or SIGINT) stops accepting input, sends what was accepted,
waits until downstream has handed it on (DONE) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from threadpoolctl import threadpool_limits

from quantpipe import wire
from quantpipe.engines.base import Engine
from quantpipe.errors import ConfigError, FrameError, QuantpipeError
from quantpipe.quant import codec
from quantpipe.quant.linkcodec import BoundaryCodec, CheckedFrame
from quantpipe.runtime import security
from quantpipe.runtime.builtin import make_builtin
from quantpipe.runtime.config import BUILTIN_PREFIX, PipelineConfig, load_config
from quantpipe.runtime.health import Health, HealthServer, stage_facts
from quantpipe.runtime.inbox import Inbox
from quantpipe.runtime.link import LinkOptions, LinkReceiver, LinkSender, Message
from quantpipe.runtime.metrics import DaemonMetrics
from quantpipe.runtime.policy import make_policy
from quantpipe.runtime.shaping import MBIT, EmulatedLink

__all__ = ["StageDaemon", "load_stage_engine", "load_table", "add_arguments", "run"]

log = logging.getLogger(__name__)


def load_stage_engine(cfg: PipelineConfig, k: int) -> Engine:
    """Stage ``k``'s engine: an exported graph via :func:`quantpipe.engines.load_engine`, or a builtin."""
    spec = cfg.stages[k].engine
    if spec.startswith(BUILTIN_PREFIX):
        shape = tuple(cfg.input_shape)
        if not shape and cfg.stages_dir:
            from quantpipe.manifest import load_manifest

            shape = tuple(load_manifest(cfg.stages_dir, verify=False).stages[0].input.shape[1:])
        engine = make_builtin(cfg.stages[0].engine, shape) if cfg.stages[0].engine.startswith(BUILTIN_PREFIX) else None
        for i in range(1, k + 1):  # builtin shapes chain: stage i takes what stage i-1 produced
            prev = engine.output.shape[1:] if engine is not None else ()
            engine = make_builtin(cfg.stages[i].engine, prev) if cfg.stages[i].engine.startswith(BUILTIN_PREFIX) else None
        if engine is None:
            raise ConfigError("a builtin stage after an exported stage needs the exported stage's shape; "
                              "use builtin engines for every stage or none")
        return engine
    from quantpipe.engines import load_engine

    return load_engine(spec, backend=cfg.backend, threads=cfg.threads)


def load_table(cfg: PipelineConfig) -> Any:
    """The clip table (checked against the manifest when both are configured), or None."""
    if not cfg.clip_table:
        return None
    from quantpipe.quant.table import ClipTable

    manifest = None
    if cfg.stages_dir:
        from quantpipe.manifest import load_manifest

        manifest = load_manifest(cfg.stages_dir, verify=False)
    return ClipTable.load(cfg.clip_table, manifest=manifest)


class StageDaemon:
    """One pipeline stage: inbound link, engine, policy, outbound link.

    Args:
        cfg: the resolved pipeline config.
        k: this stage's index.
        start_time: wall-clock t = 0 of the bandwidth schedule; None starts it with the first microbatch
            received (every stage then sees its step within a pipeline latency of the others).
        events: optional JSON-lines file that receives one record per policy window.
        health_port: serve ``/healthz`` and ``/readyz`` on this port (0: a free one; None: not at all).
        ctx: ZeroMQ context (a new one by default).
    """

    def __init__(self, cfg: PipelineConfig, k: int, *, start_time: float | None = None, events: str = "",
                 health_port: int | None = None, ctx: zmq.Context | None = None) -> None:
        if not 0 <= k < len(cfg.stages):
            raise ConfigError(f"--stage {k}: the config has stages 0..{len(cfg.stages) - 1}")
        self.cfg, self.k = cfg, k
        self.last = k == len(cfg.stages) - 1
        self.start_time = start_time
        self.metrics = DaemonMetrics(str(k), cfg.stages[k].metrics_port)
        self.engine = load_stage_engine(cfg, k)
        self.table = load_table(cfg)
        table_bits = tuple(self.table.bits) if self.table is not None else tuple(b for b in cfg.bits if b != 32)
        self.method = self.table.method_index(cfg.method) if self.table is not None else 0
        if self.last:
            self.policy = make_policy("fixed", allowed=[32], target_rate=cfg.target_rate, fixed_bits=32)
        else:
            self.policy = make_policy(cfg.policy, allowed=cfg.allowed_bits(table_bits), target_rate=cfg.target_rate,
                                      upgrade_margin=cfg.upgrade_margin, fixed_bits=cfg.fixed_bits)
        self.bits = self.policy.initial()
        self.fp32_per_image = 4 * int(np.prod(self.engine.output.shape[1:]))
        self.ctx = ctx or security.context(cfg.keys_dir, k, len(cfg.stages))  # CURVE when keys_dir is set
        opts = LinkOptions(window=cfg.credits)
        self.schedule = cfg.schedule if (cfg.shaping == "emulate" and not self.last) else None
        shaper = None
        if self.schedule is not None:
            shaper = EmulatedLink(self.schedule.rate_at(0) * MBIT, time.monotonic())
        self.inbound = LinkReceiver(self.ctx, cfg.stages[k].address, opts, stage=k, on_reject=self.metrics.error)
        # A window normally spans N microbatches; it is cut at twice its nominal duration so that a
        # collapsing link is noticed within about two nominal windows (see BandwidthEstimator).
        nominal_s = cfg.window * cfg.microbatch / cfg.target_rate
        self.outbound = LinkSender(self.ctx, cfg.downstream_address(k), opts, stage=k, policy_window=cfg.window,
                                   max_window_s=2 * nominal_s, shaper=shaper)
        # Frames are read, validated and acked on arrival by a thread (quantpipe.runtime.inbox), so
        # the upstream's bandwidth samples measure the link, not this stage's compute. The queue holds
        # at most what the upstream may keep in custody here (LinkSender.custody_limit).
        # The numbers of both links, resolved once (quantpipe.quant.linkcodec): stage k decodes boundary
        # k-1 (or the source's input) and encodes boundary k. On a GPU engine both run on the device.
        codec_cls, self.on_device = self._codec_class()
        self.rx_codec = codec_cls(self.table, max(k - 1, 0), stage=k, max_payload=opts.max_message_bytes)
        self.tx_codec = codec_cls(self.table, k, self.method, stage=k)
        self.inbox = Inbox(self.ctx, self.inbound, capacity=cfg.credits + 2, validate=self._validate)
        # Custody: upstream may forget a microbatch (DONE) once our output for it is acked downstream
        # (the same seq on every hop); until then it resends it if we die holding it.
        self.outbound.on_ack = self.inbox.done
        self.events = Path(events) if events else None
        self.stopping = False
        self._stop_at = 0.0
        self.drain_timeout_s = 10.0
        self._exported = (0, 0)
        self.metrics.bits.set(self.bits)
        if hasattr(codec, "warmup"):
            codec.warmup()  # compile the fast kernel now, not on the first frame
        self.health = Health(required=("engine", "upstream", "downstream"))
        self.health_server = HealthServer(self.health, health_port, addr="0.0.0.0").start() \
            if health_port is not None else None
        # pipeline.threads bounds everything the stage runs: the engine's own pools (passed to it) and
        # every BLAS/OpenMP pool loaded by now (numpy's and scipy's for builtin engines and rotations),
        # which default to one thread per core.
        self._thread_limits = threadpool_limits(limits=cfg.threads)
        self.metrics.serve()
        self._event({"event": "ready", "bits": self.bits})
        log.info("stage %d: %s; in %s, out %s; bits %s (policy %s); config %s", k, self.engine.describe(),
                 self.inbound.endpoint, cfg.downstream_address(k), self.bits, type(self.policy).__name__,
                 json.dumps(cfg.to_dict(), sort_keys=True))

    # ------------------------------------------------------------------------------ the data path
    def process(self, msg: Message) -> None:
        """Receive -> decode -> run the engine -> choose the bitwidth -> encode -> send."""
        if msg.header.msg_type == wire.MsgType.ERROR:  # an upstream failure: pass the report on
            self._send(msg.frames + [wire.pack_trace(msg.t_origin)], msg.header.seq, msg.header.batch, 32, 0, False)
            return
        cpu, t0 = self.metrics.cpu, time.thread_time()
        w0 = time.perf_counter()
        try:  # the inbox validated and acked it (msg.checked): from here on it ends as a result or an error
            checked = getattr(msg, "checked", None) or self.rx_codec.check(msg.frames)
            header = checked.header
            x = self.rx_codec.decode(checked)
        except (FrameError, ValueError) as exc:
            self._report_error(msg.header, msg.t_origin, "decode", f"stage {self.k} could not decode: {exc}")
            return
        t1, w1 = time.thread_time(), time.perf_counter()
        cpu["decode"].inc(t1 - t0)
        self.metrics.decode_seconds.observe(w1 - w0)
        self.metrics.images_in.inc(header.batch)
        try:
            y = self.engine.run_device(x) if self.on_device else self.engine.run(x)
        except Exception as exc:  # a failed microbatch becomes an explicit error result, not a dead daemon
            self._report_error(header, msg.t_origin, "engine", f"stage {self.k} engine failed: {exc}")
            return
        t2, w2 = time.thread_time(), time.perf_counter()
        cpu["engine"].inc(t2 - t1)
        self.metrics.stage_seconds.observe(w2 - w1)
        # Take the credit first, then encode: the frame goes out at the bitwidth in force when it is sent,
        # not at one chosen before a wait on a slow link.
        if not self._wait_credit(header.seq):
            return
        self._after_link_activity()  # a window that closed during the wait sets the bits of this frame
        t3, w3 = time.thread_time(), time.perf_counter()
        bits = self.bits
        try:
            frames = self.tx_codec.encode(y, bits, seq=header.seq, first_id=header.first_id)
        except (ValueError, QuantpipeError) as exc:  # e.g. NaN in the activations
            self._report_error(header, msg.t_origin, "encode", f"stage {self.k} could not encode: {exc}")
            return
        t4, w4 = time.thread_time(), time.perf_counter()
        cpu["encode"].inc(t4 - t3)
        self.metrics.encode_seconds.observe(w4 - w3)
        frames.append(wire.pack_trace(msg.t_origin))
        self._transmit(frames, header.seq, header.batch, bits, self.fp32_per_image * header.batch, True)
        cpu["send"].inc(time.thread_time() - t4)
        self.metrics.microbatches.inc()

    def _validate(self, msg: Message) -> CheckedFrame | None:
        """Runs in the inbox thread before the ack: refuse (unacked) what could not be decoded.

        The result travels with the message (``msg.checked``), so the frame is validated once."""
        if msg.header.msg_type != wire.MsgType.DATA:
            return None
        t0 = time.thread_time()
        try:
            checked = self.rx_codec.check(msg.frames)
        finally:
            self.metrics.cpu["validate"].inc(time.thread_time() - t0)
        msg.checked = checked
        return checked

    def _codec_class(self) -> tuple[type, bool]:
        """The GPU codec when the engine runs on a CUDA device and the GPU kernels load, else the CPU one."""
        if getattr(self.engine, "device", "cpu") != "cuda":
            log.info("stage %d: codec on the CPU (engine on the %s)", self.k, getattr(self.engine, "device", "cpu"))
            return BoundaryCodec, False
        try:
            from quantpipe.quant import gpu
        except ImportError as exc:
            log.warning("stage %d: engine on the GPU but the GPU codec cannot load (%s): codec on the CPU", self.k, exc)
            return BoundaryCodec, False
        if not gpu.available():
            log.warning("stage %d: engine on the GPU but the GPU codec is unavailable: codec on the CPU", self.k)
            return BoundaryCodec, False
        log.info("stage %d: codec on the GPU, engine outputs stay on the device", self.k)
        return gpu.GpuBoundaryCodec, True

    def _wait_credit(self, seq: int) -> bool:
        # Blocking on credit is the backpressure: upstream stops getting acks and stops sending.
        # After a stop request it waits at most the drain time (downstream may be gone for good).
        if not self.outbound.wait_credit(should_stop=self._drain_expired, idle=self._idle):
            self.metrics.error("dropped_at_shutdown")
            log.error("stage %d: shutting down with microbatch %d unsent: downstream took nothing for %.0f s",
                      self.k, seq, self.drain_timeout_s)
            return False
        return True

    def _send(self, frames: list, seq: int, images: int, bits: int, fp32_bytes: int, measured: bool) -> None:
        if self._wait_credit(seq):
            self._transmit(frames, seq, images, bits, fp32_bytes, measured)

    def _transmit(self, frames: list, seq: int, images: int, bits: int, fp32_bytes: int, measured: bool) -> None:
        self.outbound.send(frames, seq=seq, images=images, bits=bits, fp32_bytes=fp32_bytes, measured=measured)
        if measured:
            self.metrics.images_out.inc(images)
            self.metrics.bytes_out.inc(sum(_nbytes(f) for f in frames))
        self._after_link_activity()

    def _report_error(self, header: wire.FrameHeader, t_origin: float, kind: str, message: str) -> None:
        self.metrics.error(kind)
        log.error("microbatch %d (images %d..%d): %s", header.seq, header.first_id,
                  header.first_id + header.batch - 1, message)
        body = json.dumps({"kind": kind, "message": message, "stage": self.k}).encode()
        frames = wire.encode_control(wire.MsgType.ERROR, seq=header.seq, stage=self.k, first_id=header.first_id,
                                     count=header.batch, body=body)
        self._send(frames + [wire.pack_trace(t_origin)], header.seq, header.batch, 32, 0, False)

    # ------------------------------------------------------------------------------ housekeeping
    def _idle(self) -> None:
        self._check_inbox()
        self._apply_schedule()
        self.health.beat(**stage_facts(self))

    def _apply_schedule(self) -> None:
        if self.schedule is None or self.outbound.shaper is None:
            return
        if self.start_time is None:
            return  # the schedule's clock starts with the first microbatch (see __init__)
        rate = self.schedule.rate_at(time.time() - self.start_time) * MBIT
        if rate != self.outbound.shaper.rate:
            self.outbound.shaper.set_rate(rate, time.monotonic())
            self._event({"event": "rate", "mbit": rate / MBIT})

    def _event(self, record: dict[str, Any]) -> None:
        if self.events is not None:
            with self.events.open("a") as f:
                f.write(json.dumps({"t": time.time(), "stage": self.k, **record}) + "\n")

    def _after_link_activity(self) -> None:
        for stats in self.outbound.take_windows():
            previous = self.bits
            self.bits = self.policy.update(stats)
            self.metrics.bits.set(self.bits)
            self.metrics.bandwidth.set(stats.bandwidth)
            record = {"event": "window", "bits": stats.bits, "next_bits": self.bits,
                      "bandwidth_Bps": stats.bandwidth, "ratio": getattr(self.policy, "last_ratio", None),
                      "images": stats.images, "bytes": stats.bytes, "busy_s": stats.busy_s,
                      "stall_s": stats.stall_s, "elapsed_s": stats.elapsed_s, "output_rate": stats.output_rate,
                      "closed_early": getattr(stats, "closed_early", False),
                      "upper_bound": getattr(stats, "upper_bound", False),
                      "from_tcp": getattr(stats, "from_tcp", False)}
            if self.bits != previous:
                log.info("stage %d: %d -> %d bits (link %.1f Mbit/s, %.1f img/s)", self.k, previous, self.bits,
                         stats.bandwidth / MBIT, stats.output_rate)
            self._event(record)
        self.metrics.queue_depth.set(self.outbound.in_flight)
        self.metrics.peer_up.labels(str(self.k), "out").set(1 if self.outbound.peer_alive() else 0)
        self.metrics.peer_up.labels(str(self.k), "in").set(1 if self.inbound.peer_alive() else 0)
        # The links count on their own (they know no Prometheus); export the increments.
        self.metrics.resends.inc(self.outbound.resends - self._exported[0])
        self.metrics.duplicates.inc(self.inbound.duplicates - self._exported[1])
        self._exported = (self.outbound.resends, self.inbound.duplicates)

    def stop(self, *_: Any) -> None:
        """Stop accepting input; :meth:`serve` then drains (at most ``drain_timeout_s``) and returns."""
        if not self.stopping:
            self._stop_at = time.monotonic()
        self.stopping = True

    def _drain_expired(self) -> bool:
        return self.stopping and time.monotonic() - self._stop_at > self.drain_timeout_s

    def serve(self, drain_timeout_s: float = 10.0) -> int:
        """Run until :meth:`stop` (or SIGTERM), then drain the outbound link. Returns the exit code."""
        self.drain_timeout_s = drain_timeout_s
        # One poller over the outbound link and the inbox: an ack is timed when it arrives, not when
        # the daemon next looks (a late look would add its wait to the link's busy time).
        poller = zmq.Poller()
        poller.register(self.outbound.sock, zmq.POLLIN)
        poller.register(self.inbox.socket, zmq.POLLIN)
        self.inbox.start()
        while not self.stopping:
            wait_ms = 0 if self.inbox.queued else (10 if self.outbound.shaper is not None else 50)
            poller.poll(wait_ms)
            self.outbound.pump(0.0)
            self._apply_schedule()
            self._check_inbox()
            msg = self.inbox.take()
            if msg is not None:
                if self.start_time is None:
                    self.start_time = time.time()
                    self._apply_schedule()
                self.process(msg)
            self._after_link_activity()
            self.health.beat(**stage_facts(self))
        # Take no new input, but hand on what was acknowledged already (else upstream resends it later).
        self.inbox.pause()
        while (msg := self.inbox.take()) is not None:
            self.process(msg)
        drained = self.outbound.drain(max(0.0, drain_timeout_s - (time.monotonic() - self._stop_at)),
                                      idle=self._check_inbox)
        log.info("stage %d: stopped (%s)", self.k, "drained" if drained else
                 f"{self.outbound.in_flight + self.outbound.in_custody} microbatch(es) not handed on after "
                 f"{drain_timeout_s:g} s")
        self.close()
        return 0 if drained else 1

    def _check_inbox(self) -> None:
        if self.inbox.failed is not None:  # a dead receiving thread would look like a silent upstream
            raise RuntimeError(f"stage {self.k}: the receiving thread failed") from self.inbox.failed

    def close(self) -> None:
        if self.health_server is not None:
            self.health_server.stop()
        self.inbox.close()  # stops the receiving thread, which closes the inbound link
        self.outbound.close()
        self.engine.close()


def _nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, np.ndarray) else len(frame)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline TOML file (see quantpipe.runtime.config)")
    parser.add_argument("--stage", type=int, required=True, help="index of the stage to run (0-based)")
    add_overrides(parser)
    parser.add_argument("--address", help="endpoint this stage's input binds (overrides the config)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0: none)")
    parser.add_argument("--engine", help="stage graph or builtin:NAME (overrides the config)")
    parser.add_argument("--start-time", type=float, help="wall-clock t=0 of the bandwidth schedule (unix seconds)")
    parser.add_argument("--events", default="", help="append one JSON line per policy window to this file")
    parser.add_argument("--health-port", type=int, help="serve /healthz and /readyz on this port")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """Flags shared by 'quantpipe stage' and 'quantpipe run' that override [pipeline] keys."""
    g = parser.add_argument_group("pipeline overrides")
    g.add_argument("--stages-dir", dest="stages_dir", help="export directory (manifest.json + stage graphs)")
    g.add_argument("--clip-table", dest="clip_table", help="clip table file")
    g.add_argument("--method", help="clip-table method for quantized boundaries")
    g.add_argument("--bits", dest="fixed_bits", type=int, help="fixed bitwidth (sets --policy fixed)")
    g.add_argument("--policy", choices=["paper", "fixed"], help="bitwidth policy")
    g.add_argument("--target-rate", dest="target_rate", type=float, help="target output rate, images/s")
    g.add_argument("--window", type=int, help="policy window, microbatches")
    g.add_argument("--microbatch", type=int, help="images per microbatch")
    g.add_argument("--credits", type=int, help="unacknowledged microbatches per link")
    g.add_argument("--bandwidth-schedule", dest="bandwidth_schedule", help="e.g. 0:500,20:50,40:250 (s:Mbit/s)")
    g.add_argument("--shaping", choices=["none", "emulate", "netns"], help="how the schedule is applied")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("stages_dir", "clip_table", "method", "fixed_bits", "policy", "target_rate", "window", "microbatch", "credits",
            "bandwidth_schedule", "shaping")
    out = {k: getattr(args, k, None) for k in keys}
    if out["fixed_bits"] is not None and out["policy"] is None:
        out["policy"] = "fixed"
    return out


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides_from(args))
    if not 0 <= args.stage < len(cfg.stages):
        raise ConfigError(f"--stage {args.stage}: {args.config} has stages 0..{len(cfg.stages) - 1}")
    changes = {k: v for k, v in (("address", args.address), ("metrics_port", args.metrics_port),
                                 ("engine", args.engine)) if v is not None}
    if changes:
        import dataclasses

        stages = list(cfg.stages)
        stages[args.stage] = dataclasses.replace(stages[args.stage], **changes)
        cfg = cfg.replace(stages=tuple(stages))
    # Handlers first: a SIGTERM that arrives while the engine loads must still mean "exit cleanly".
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: early.append(1))
    signal.signal(signal.SIGINT, lambda *_: early.append(1))
    daemon = StageDaemon(cfg, args.stage, start_time=args.start_time, events=args.events,
                         health_port=args.health_port)
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    if early:
        daemon.stop()
    return daemon.serve()
