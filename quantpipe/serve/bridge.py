"""The ZeroMQ side of ``quantpipe serve``: source and sink of the pipeline in one thread.

ZeroMQ sockets are not thread-safe, so one thread owns both links: a
:class:`~quantpipe.runtime.link.LinkSender` to stage 0 (what the source does) and a
:class:`~quantpipe.runtime.link.LinkReceiver` bound on ``[sink].address`` (what the sink does), with
the same protocol: credits, custody, resends on a restart, dedup by ``seq``, DONE only after the
result was handed to the waiting request. It exchanges with the asyncio fronts through the
thread-safe :class:`~quantpipe.serve.batcher.RequestQueue` (in) and ``loop.call_soon_threadsafe``
(out); a self-pipe wakes it when a request arrives.

Each microbatch ``seq`` records which request segments it holds and its ``first_id``; a result is
matched by both (a result whose ``first_id`` or size does not match is dropped, never delivered to
the wrong request). ``seq`` starts at the wall clock in microseconds, so a restarted server never
reuses a sequence number the stages still remember as seen (they drop duplicates by ``seq``).

First hop: float32 frames (``bits`` 32), or, for stages that take pixels, the uint8 pixels as an
8-bit frame with the inline per-tensor range [0, 255]: the codes are the pixel values themselves
(``floor(x * 255 / 255 + 0.5) = x``), so the payload is the array's bytes and stage 0 decodes exact
float32 pixel values, with no change to the wire format.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq

from quantpipe import wire
from quantpipe.errors import FrameError
from quantpipe.runtime.config import PipelineConfig
from quantpipe.runtime.link import LinkOptions, LinkReceiver, LinkSender, Message
from quantpipe.serve.batcher import RequestQueue, Segment
from quantpipe.serve.protocol import InferError

__all__ = ["Bridge", "SINK_STAGE", "first_hop_frame"]

log = logging.getLogger(__name__)

SINK_STAGE = 0xFFFE


def first_hop_frame(x: np.ndarray, *, seq: int, first_id: int) -> tuple[list, int]:
    """The data message of first-hop images, and its bitwidth; the payload is a view of their bytes.

    uint8 pixels travel as an exact 8-bit frame (inline range [0, 255]: the codes are the pixel values),
    float32 images as a 32-bit frame. Unlike :func:`quantpipe.wire.encode_frame` this does not scan for
    NaN: the service took only finite images (FP32 inputs are checked on arrival, decoded images are
    finite by construction), and a second pass over every microbatch in this one thread cost a fifth of
    its time at 2,000 images/s."""
    pixels = x.dtype == np.uint8
    x = np.ascontiguousarray(x, dtype=np.uint8 if pixels else np.float32)
    bits = 8 if pixels else 32
    kind, hi = (wire.RangeKind.INLINE, 255.0) if pixels else (wire.RangeKind.NONE, 0.0)
    header = wire.pack_header(wire.FrameHeader(seq=seq, first_id=first_id, shape=tuple(x.shape), bits=bits,
                                               range_kind=kind, lo=0.0, hi=hi, payload_len=x.nbytes))
    return [header, memoryview(x.reshape(-1).view(np.uint8))], bits


@dataclass
class _InFlight:
    first_id: int
    count: int
    segments: list[Segment]
    sent_at: float


class Bridge:
    """Owns the two links; cuts queued requests into microbatches and routes results back.

    Args:
        cfg: the pipeline config (stage 0's address, ``[sink].address``, credits, keys).
        queue: the request queue the fronts fill.
        deliver: called on the event loop with a list of (segment, results or InferError) per result.
        post: schedules a callable on the event loop (``loop.call_soon_threadsafe``).
        ctx: ZeroMQ context (CURVE-configured when ``keys_dir`` is set).
        observe_batch: called with each microbatch's size, its requests' queue times and its bytes (metrics).
        observe_round_trip: called with each answered microbatch's seconds from its send to its result.
        on_reject: called with the kind of every result message dropped (metrics).
        stall_s: not ready while a microbatch is older than this (and 4x the slowest round trip).
    """

    def __init__(self, cfg: PipelineConfig, queue: RequestQueue, deliver: Callable, post: Callable,
                 ctx: zmq.Context, observe_batch: Callable[[int, list[float], int], None] = lambda n, q, b: None,
                 on_reject: Callable[[str], None] = lambda kind: None, stall_s: float = 10.0,
                 observe_round_trip: Callable[[float], None] = lambda s: None) -> None:
        self.cfg = cfg
        self.queue = queue
        self.deliver = deliver
        self.post = post
        self.observe_batch = observe_batch
        self.observe_round_trip = observe_round_trip
        self.stall_s = stall_s
        self._slowest = 0.0  # longest microbatch round trip seen, s
        opts = LinkOptions(window=cfg.credits)
        self.sender = LinkSender(ctx, cfg.stages[0].address, opts, stage=wire.SOURCE_STAGE, policy_window=cfg.window)
        self.receiver = LinkReceiver(ctx, cfg.sink.address, opts, stage=SINK_STAGE, on_reject=on_reject)
        self.sender.on_done = lambda seq: None
        self._seq = time.time_ns() // 1000  # see the module docstring: never below a previous server's
        self._next_id = 0
        self._inflight: dict[int, _InFlight] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- any thread -------------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def ready(self) -> bool:
        """Both ends of the pipeline are alive (stage 0 answers us, the last stage reaches us) and the
        pipeline is not stalled (see :meth:`stalled`)."""
        return self.sender.peer_alive() and self.receiver.peer_alive() and not self.stalled()

    def stalled(self) -> bool:
        """A microbatch has been in the pipeline for longer than ``stall_s`` and four times the slowest
        one seen: a stage between the two ends is down (its neighbours keep heartbeating, so only the
        missing results show it). Safe to call from another thread."""
        entries = tuple(self._inflight.values())  # one atomic copy: the ZeroMQ thread changes the dict
        if not entries:
            return False
        oldest = min(e.sent_at for e in entries)
        return time.monotonic() - oldest > max(self.stall_s, 4 * self._slowest)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def start(self) -> "Bridge":
        self._thread = threading.Thread(target=self._run, name="quantpipe-serve-zmq", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- the ZeroMQ thread ------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sender.sock, zmq.POLLIN)
        poller.register(self.receiver.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        tick = self.sender.options.heartbeat_interval_s / 2
        try:
            while not self._stopping:
                due = self.queue.due_in(time.monotonic(), idle=not self._inflight)
                timeout = tick if due is None or not self.sender.has_credit() else min(tick, due)
                events = dict(poller.poll(max(0, int(timeout * 1000))))
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                self.sender.pump(0.0)  # acks, DONEs, resends, heartbeats
                while (msg := self.receiver.receive(0.0)) is not None:
                    self._on_result(msg)
                self._send_due()
        except Exception:  # a bug: say so loudly, and fail what waits instead of leaving it hanging
            log.exception("serve: the ZeroMQ thread failed")
            self._fail_all(InferError("internal error in the server's pipeline thread", 500, "internal"))
        finally:
            self.sender.close()
            self.receiver.close(0.5)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _send_due(self) -> None:
        while self.sender.has_credit():
            now = time.monotonic()
            batch = self.queue.take(now, force=not self._inflight)
            if batch is None:
                return
            segments, x = batch
            seq, first = self._seq, self._next_id
            self._seq += 1
            self._next_id += len(x)
            frames, bits = first_hop_frame(x, seq=seq, first_id=first)
            nbytes = sum(len(memoryview(f).cast("B")) for f in frames)
            self._inflight[seq] = _InFlight(first, len(x), segments, now)
            self.sender.send(frames + [wire.pack_trace(time.time())], seq=seq, images=len(x), bits=bits,
                             fp32_bytes=4 * x.size)
            self.observe_batch(len(x), [now - s.request.created for s in segments], nbytes)

    def _on_result(self, msg: Message) -> None:
        h = msg.header
        entry = self._inflight.get(h.seq)
        if entry is None or h.first_id != entry.first_id or h.batch != entry.count:
            # Not ours (a stale resend from before our start) or inconsistent: never deliver it.
            exc = FrameError(f"result for microbatch {h.seq} (images {h.first_id}+{h.batch}) matches nothing sent",
                             "unmatched")
            if entry is None:
                # Take it so the last stage stops resending it, but only a frame that would be accepted:
                # garbage with a plausible seq must not be answered or move custody (issue 12.1).
                try:
                    self.receiver.validate(msg)
                except FrameError as bad:
                    self.receiver.reject(msg, bad)
                    return
                self.receiver.reject(msg, exc)
                self.receiver.accept(msg)
                self.receiver.done(h.seq)
            else:
                self.receiver.reject(msg, exc)
            return
        if h.msg_type == wire.MsgType.ERROR:
            try:
                report = json.loads(msg.body.decode())
            except (UnicodeDecodeError, ValueError):
                report = {}
            self.receiver.accept(msg)
            err = InferError(f"the pipeline failed on this request: {report.get('message', 'unreadable error report')}",
                             500, f"stage_{report.get('kind', 'unknown')}")
            parts = [(s, err) for s in entry.segments]
        else:
            try:
                _, y = wire.decode_frame(msg.frames, max_payload=self.receiver.options.max_message_bytes)
            except FrameError as exc:
                self.receiver.reject(msg, exc)  # unacked: the last stage resends it
                return
            self.receiver.accept(msg)
            parts = [(s, y[s.offset:s.offset + s.count]) for s in entry.segments]
        del self._inflight[h.seq]
        trip = time.monotonic() - entry.sent_at
        self._slowest = max(self._slowest, trip)
        self.observe_round_trip(trip)
        self.post(self.deliver, parts)
        self.receiver.done(h.seq)  # handed to the waiting requests: the last stage may forget it

    def _fail_all(self, exc: InferError) -> None:
        parts = [(s, exc) for e in self._inflight.values() for s in e.segments]
        self._inflight.clear()
        if parts:
            self.post(self.deliver, parts)
