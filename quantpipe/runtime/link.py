"""Links between pipeline processes: acknowledged, credit-limited, heartbeated ZeroMQ DEALER -> ROUTER.

Every hop of the pipeline (source -> stage 0 -> ... -> stage K -> sink) is one link. The downstream
side binds a ROUTER socket (:class:`LinkReceiver`), the upstream side connects a DEALER
(:class:`LinkSender`). Why this pair and not PUSH/PULL or REQ/REP:

* **One socket carries both directions.** Data flows down, acks and heartbeats flow back up on the same
  connection, so there is no second address to configure, firewall or keep consistent, and a
  heartbeat proves exactly the connection the data uses (the ZeroMQ Guide's advice: heartbeat on the
  data socket). PUSH/PULL would need a second return socket.
* **No lock-step.** REQ/REP allows one message in flight; DEALER/ROUTER lets the sender keep a window
  of microbatches in flight, which a high-latency link needs to stay busy.
* **Peers are addressable.** The ROUTER learns each sender's routing id from its messages and can ack
  or heartbeat it at any time, even while the stage is blocked on its own downstream. That lets a
  busy-but-alive stage be told apart from a dead one.
* **Reconnects are free.** A DEALER reconnects by itself when the downstream process is restarted;
  what the dead process had not acknowledged is still in the sender's window and is resent.

The protocol on a link (all headers are :mod:`quantpipe.wire` headers, validated before use):

* ``DATA [header, payload(, crc), trace]`` and ``ERROR [header, body, trace]`` flow downstream; both
  carry the microbatch's sequence number ``seq``, which is the same on every hop.
* ``ACK [header]`` (``seq`` = the accepted microbatch, ``first_id`` = the receiver's incarnation) is
  sent after the receiver has validated the frame and taken it in: it means *received*. It frees one
  **credit**: a sender never has more than ``window`` microbatches unacknowledged, which bounds the
  memory of every hop however slow the link or the next stage is (and, once the bandwidth is known,
  no more than ``inflight_delay_s`` worth of bytes, so a link that slows down drains quickly). The same acks drive the **bandwidth
  measurement** (:mod:`quantpipe.runtime.bandwidth`: acknowledged bytes over busy time).
* ``DONE [header]`` means *handed on*: a stage sends it upstream once its own downstream acked its
  output for that ``seq``, the sink once the results are written and flushed. Between ACK and DONE
  the sender keeps the microbatch in **custody** and resends it if the receiver restarts (what it
  held died with it), so "received" can be acknowledged early without risking a loss. Custody is
  bounded (unacknowledged plus in custody at most ``window + 2``): a receiver that takes but
  never hands on stops its sender, not its memory. A DONE also counts as the ACK if that was lost; a duplicate of a finished ``seq`` is
  answered with ACK and DONE again, and DONE goes to whichever sender last sent the ``seq`` (a
  restarted upstream has a new routing id).
* ``HEARTBEAT [header]`` (``first_id`` = the sender's incarnation, a random number per process) goes
  both ways when a side has sent nothing to its peer for ``heartbeat_interval_s``. A peer silent for
  ``peer_timeout_s`` is considered dead.
* **Resend + dedup.** Unacked microbatches and those in custody are resent at once when the receiver's
  incarnation changes (it was restarted: whatever it held is gone), and after ``resend_timeout_s`` with capped exponential
  backoff while the peer is silent. Resends to a live peer would only duplicate data on a slow link, so
  they wait for the long ``resend_backoff_max_s``. The receiver drops duplicates by ``seq`` (and acks
  them again, so the sender stops resending), but only after checking them exactly like a new frame
  (:attr:`LinkReceiver.validate`): an invalid message is rejected and counted whatever its ``seq``,
  so a forged duplicate can neither be answered nor take a microbatch's custody.
* Every received message must fit ``max_message`` bytes per frame (``zmq.MAXMSGSIZE``: an oversized
  peer is disconnected by libzmq before Python sees the bytes); anything malformed is counted by
  :attr:`~quantpipe.errors.FrameError.kind` and dropped, and the daemon keeps serving.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import zmq

from quantpipe import wire
from quantpipe.errors import FrameError
from quantpipe.runtime.bandwidth import BandwidthEstimator, WindowStats
from quantpipe.runtime.shaping import EmulatedLink
from quantpipe.runtime.tcpinfo import tcp_progress_for

__all__ = ["LinkOptions", "LinkSender", "LinkReceiver", "Message"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkOptions:
    """Reliability and flow-control settings of a link (units in the names)."""

    window: int = 4
    resend_timeout_s: float = 1.0
    resend_backoff_max_s: float = 30.0
    heartbeat_interval_s: float = 0.5
    peer_timeout_s: float = 3.0
    max_message_bytes: int = 256 * 1024 * 1024
    inflight_delay_s: float = 0.1
    #: also read the TCP connection's acknowledged bytes inside frames (Linux; see quantpipe.runtime.tcpinfo)
    tcp_progress: bool = True


#: Closed bandwidth windows a sender keeps for take_windows() (the stage takes them every iteration).
_KEPT_WINDOWS = 64


def _incarnation() -> int:
    return int.from_bytes(os.urandom(8), "little") | 1  # never 0, which means "unknown"


@dataclass
class _Pending:
    seq: int
    frames: list
    nbytes: int
    images: int
    bits: int
    fp32_bytes: int
    measured: bool
    attempts: int = 0
    next_resend: float = 0.0
    on_wire: bool = False
    release_at: float | None = None  # when the frame has crossed an emulated link


class LinkSender:
    """The upstream end of a link: a DEALER with a credit window, resends and heartbeats.

    Args:
        ctx: the process's ZeroMQ context.
        address: the downstream ROUTER's endpoint, e.g. ``tcp://10.0.1.2:5500``.
        options: window and timers.
        stage: this process's stage index (the source is :data:`wire.SOURCE_STAGE`).
        policy_window: acknowledged microbatches per bandwidth window.
        max_window_s: time cap of a bandwidth window (see :class:`BandwidthEstimator`).
        shaper: optional emulated slow link; None sends at the network's own speed.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, ctx: zmq.Context, address: str, options: LinkOptions, *, stage: int,
                 policy_window: int = 10, max_window_s: float | None = None, shaper: EmulatedLink | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.options = options
        self.stage = stage
        self.shaper = shaper
        self.clock = clock
        self.incarnation = _incarnation()
        self.estimator = BandwidthEstimator(policy_window, max_window_s)
        self.peer_incarnation = 0
        self.resends = 0
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # No zmq.IMMEDIATE: with it, libzmq tears down the pipe the moment the peer disconnects and
        # drops what was received but not yet read, so the sink's last ACK/DONE (sent just before it
        # exits) was often lost and the last stage could not drain. Without it, a frame sent before the
        # connection is up waits in the pipe (bounded by SNDHWM and our own window), and a duplicate
        # that reaches a restarted receiver is dropped by seq there.
        self.sock.setsockopt(zmq.SNDHWM, options.window + 8)
        self.sock.setsockopt(zmq.RCVHWM, 4 * options.window + 64)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # only small control messages come back
        # The kernel's acknowledged-byte counter measures the link inside a frame (bandwidth.py). An
        # emulated link delays frames in this process, where TCP cannot see it: it emulates the counter.
        self.tcp = tcp_progress_for(self.sock, address) if options.tcp_progress and shaper is None else None
        self._progress = self.tcp.read if self.tcp is not None else \
            shaper.progress if options.tcp_progress and shaper is not None else None
        self._tcp_read_at = -1e18
        self.sock.connect(address)  # after the monitor, so that its connection event is seen
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        # Acked (the receiver holds them) but not DONE (not yet handed on): resent if the receiver
        # restarts, because what it held died with it.
        self._custody: OrderedDict[int, _Pending] = OrderedDict()
        self.on_ack: Callable[[int], None] = lambda seq: None  # a seq was acked (first word of it)
        self.on_done: Callable[[int], None] = lambda seq: None  # a seq was handed on: custody released
        self._inflight_bytes = 0
        now = clock()
        self._last_heard = -1e18
        self._last_sent = now - options.heartbeat_interval_s
        # closed windows until take_windows(); bounded: the source and the serve bridge never take them
        # (a server running for days would otherwise keep every window it ever measured)
        self._windows: deque[WindowStats] = deque(maxlen=_KEPT_WINDOWS)

    # -- state ---------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Microbatches sent (or queued to send) and not acknowledged."""
        return len(self._pending)

    @property
    def custody_limit(self) -> int:
        """Most microbatches unacknowledged plus in custody (``window + 2``): enough for a full window
        on the link plus one in the receiver's hand and one ready behind it. More would only queue
        work at the receiver: after a link slows down, a deeper queue is a longer backlog to drain
        before the output rate settles (the adaptation target)."""
        return self.options.window + 2

    @property
    def in_custody(self) -> int:
        """Microbatches the receiver acknowledged but has not yet handed on (DONE): kept for a resend."""
        return len(self._custody)

    def has_credit(self) -> bool:
        """Room for one more microbatch: fewer than ``window`` unacked, and (once the bandwidth is
        known) less than ``inflight_delay_s`` worth of bytes unacked. The byte bound keeps the data
        committed at the current bitwidth small when the link slows down: after a 10x drop, what is
        already in flight takes 10x longer to drain, and the new bitwidth only helps after that."""
        if len(self._pending) >= self.options.window:
            return False
        if len(self._pending) + len(self._custody) >= self.custody_limit:
            return False  # the receiver holds all it may (acked, not handed on): bounded memory everywhere
        limit = self.estimator.estimate * self.options.inflight_delay_s
        # One frame is always allowed; a second only while less than inflight_delay_s of link time is
        # unacknowledged. A frame longer than that on its own (a 32-bit microbatch on a link that just
        # collapsed) is the only one committed at the old bitwidth: the next is encoded after its ack,
        # at the bitwidth that ack's window chose. The cost is a round trip of idle link per frame
        # while frames are that long (raise inflight_delay_s on a high-latency link).
        return not self._pending or limit <= 0 or self._inflight_bytes < limit

    def peer_alive(self) -> bool:
        return self.clock() - self._last_heard < self.options.peer_timeout_s

    def take_windows(self) -> list[WindowStats]:
        """Bandwidth windows closed since the last call."""
        out = list(self._windows)
        self._windows.clear()
        return out

    # -- sending -------------------------------------------------------------------------------
    def send(self, frames: list, *, seq: int, images: int, bits: int = 32, fp32_bytes: int = 0,
             measured: bool = True) -> None:
        """Queue one microbatch (frames already include the trace) and put it on the link if possible.

        The caller must hold a credit (:meth:`has_credit`, or :meth:`wait_credit`).
        """
        if not self.has_credit():
            raise RuntimeError("send without a credit: call wait_credit() first")
        if seq in self._pending:
            raise RuntimeError(f"microbatch {seq} is already in flight on this link")
        nbytes = sum(len(memoryview(f).cast("B")) if not isinstance(f, bytes) else len(f) for f in frames)
        p = _Pending(seq, frames, nbytes, images, bits, fp32_bytes, measured)
        self._pending[seq] = p
        self._inflight_bytes += nbytes
        if measured:
            self.estimator.on_send(self.clock())
        self._transmit_queued()

    def _transmit(self, p: _Pending, now: float) -> bool:
        if self.shaper is not None:
            if p.release_at is None:
                p.release_at = self.shaper.release_time(p.nbytes, now)
            if now < p.release_at:
                return False  # still crossing the emulated link
        try:
            self.sock.send_multipart(p.frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False  # the pipe is full (SNDHWM): stays pending
        p.on_wire = True
        p.attempts += 1
        backoff = min(self.options.resend_timeout_s * 2 ** (p.attempts - 1), self.options.resend_backoff_max_s)
        p.next_resend = now + backoff
        self._last_sent = now
        return True

    def _transmit_queued(self) -> None:
        now = self.clock()
        for p in self._pending.values():
            if not p.on_wire and not self._transmit(p, now):
                break  # keep order: later frames wait for the earlier ones

    def _resend_due(self, now: float) -> None:
        silent = not self.peer_alive()
        for p in self._pending.values():
            if not p.on_wire or now < p.next_resend:
                continue
            # A live peer that has not acked is busy (backpressure): resending would only duplicate.
            if silent or now - p.next_resend > self.options.resend_backoff_max_s:
                if self._transmit(p, now):
                    self.resends += 1

    def _resend_all(self) -> None:
        if self._custody:  # what the dead receiver had accepted goes out again, first and in order
            merged = OrderedDict(sorted([*self._custody.items(), *self._pending.items()]))
            for p in self._custody.values():
                self._inflight_bytes += p.nbytes
                p.measured = False  # its ack was counted already; a resend is no bandwidth sample
            self._custody.clear()
            self._pending = merged
        for p in self._pending.values():
            p.on_wire = False
            p.release_at = None  # a resend crosses the (emulated) link again
        self.resends += len(self._pending)
        self._transmit_queued()

    # -- receiving control ---------------------------------------------------------------------
    def _handle(self, frames: list) -> None:
        try:
            header, _ = wire.decode_control(frames)
        except FrameError as exc:
            log.warning("link %s: dropped a malformed control message (%s)", self.address, exc.kind)
            return
        now = self.clock()
        self._last_heard = now
        restarted = self.peer_incarnation not in (0, header.first_id)
        self.peer_incarnation = header.first_id
        if restarted:
            log.warning("link %s: downstream restarted; resending %d microbatch(es) it had not handed on",
                        self.address, len(self._pending) + len(self._custody))
            self._resend_all()
        if header.msg_type in (wire.MsgType.ACK, wire.MsgType.DONE):
            p = self._pending.pop(header.seq, None)
            if p is not None:  # first word of it (a DONE also implies an ack that may have been lost)
                self._inflight_bytes -= p.nbytes
                self._custody[header.seq] = p
                if p.measured:
                    stats = self.estimator.on_ack(now, p.nbytes, p.images, p.bits, p.fp32_bytes)
                    if stats is not None:
                        self._windows.append(stats)
                self.on_ack(header.seq)
            if header.msg_type == wire.MsgType.DONE and self._custody.pop(header.seq, None) is not None:
                self.on_done(header.seq)

    def pump(self, timeout_s: float = 0.0) -> None:
        """Put queued frames on the link, resend, heartbeat, and handle acks/heartbeats: waits up to
        ``timeout_s`` for the first incoming message and returns as soon as one was handled."""
        deadline = self.clock() + timeout_s
        while True:
            wait_ms = max(0, int((deadline - self.clock()) * 1000))
            if self.shaper is not None and any(not p.on_wire for p in self._pending.values()):
                wait_ms = min(wait_ms, 2)  # emulated frames are released by time, not by events
            handled = False
            if self.sock.poll(wait_ms, zmq.POLLIN):
                self._read_tcp(self.clock(), force=True)  # the connection's progress up to these acks
                while True:
                    try:
                        self._handle(self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=True))
                        handled = True
                    except zmq.Again:
                        break
            now = self.clock()
            self._read_tcp(now)
            self._transmit_queued()
            self._resend_due(now)
            if now - self._last_sent >= self.options.heartbeat_interval_s:
                self._heartbeat(now)
            if handled or now >= deadline:
                return

    def _read_tcp(self, now: float, force: bool = False) -> None:
        """Hand the estimator a reading of the connection's acknowledged bytes while a frame has been
        outstanding for 50 ms or more (every 20 ms at most, or ``force``: just before acks are handled).

        Frames acknowledged within 50 ms are never read: a collapse needs ``min_frame_s`` of readings,
        and ``getsockopt(TCP_INFO)`` takes the socket's lock, which libzmq's I/O thread holds while it
        copies a large frame in (on unshaped loopback, reading at every ack cost 7 % of the 32-bit rate)."""
        if self._progress is None:
            return
        if self.tcp is not None:
            self.tcp.poll_events()
        oldest = self.estimator.oldest_send
        if oldest is None or now - oldest < 0.05 or (not force and now - self._tcp_read_at < 0.02):
            return
        self._tcp_read_at = now
        reading = self._progress(now)
        if reading is not None:
            self.estimator.on_tcp(now, *reading, connection=self.tcp.generation if self.tcp is not None else 0)

    def _heartbeat(self, now: float) -> None:
        try:
            self.sock.send_multipart(wire.encode_control(wire.MsgType.HEARTBEAT, stage=self.stage,
                                                         first_id=self.incarnation), flags=zmq.NOBLOCK)
            self._last_sent = now
        except zmq.Again:
            pass  # not connected yet: nothing to tell

    def wait_credit(self, should_stop: Callable[[], bool] = lambda: False, idle: Callable[[], None] = lambda: None,
                    tick_s: float = 0.05) -> bool:
        """Block until a credit is free. Returns False if ``should_stop()`` became true first.

        ``idle`` runs every tick while waiting (the daemon heartbeats its own upstream there).
        """
        while not self.has_credit():
            if should_stop():
                return False
            self.pump(tick_s)
            idle()
        return True

    def drain(self, timeout_s: float, idle: Callable[[], None] = lambda: None) -> bool:
        """Wait until everything sent is handed on downstream (DONE) (or ``timeout_s``). True if drained."""
        deadline = self.clock() + timeout_s
        while (self._pending or self._custody) and self.clock() < deadline:
            self.pump(0.05)
            idle()
        return not (self._pending or self._custody)

    def close(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        self.sock.close(linger=0)  # unacked data is the upstream's to resend, never a reason to hang


@dataclass
class Message:
    """A data or error message the receiver validated at header level, not yet accepted."""

    peer: bytes
    header: wire.FrameHeader
    frames: list  # the data message as decode_frame expects it (no identity, no trace)
    t_origin: float
    nbytes: int = 0
    body: bytes = b""
    received_at: float = field(default=0.0)
    #: What the receiver's validate callback returned for it (e.g. the stage's checked frame), or None.
    checked: object = None


class _SeenSeqs:
    """Which sequence numbers were accepted: a watermark plus the accepted ones above it (bounded)."""

    def __init__(self, horizon: int) -> None:
        self.low = 0
        self.above: set[int] = set()
        self.horizon = horizon

    def __contains__(self, seq: int) -> bool:
        return seq < self.low or seq in self.above

    def add(self, seq: int) -> None:
        self.above.add(seq)
        while self.low in self.above:
            self.above.discard(self.low)
            self.low += 1
        if len(self.above) > self.horizon:
            # A gap that never filled (lost upstream of a restart): give up on it to stay bounded.
            self.low = min(self.above)
            self.add(self.low)


class LinkReceiver:
    """The downstream end of a link: a ROUTER that validates, dedups, acks and heartbeats.

    Args:
        ctx: the process's ZeroMQ context.
        address: the endpoint to bind, e.g. ``tcp://0.0.0.0:5500``.
        options: timers and the maximum frame size.
        stage: this process's stage index (the sink is -1, sent as 0xFFFE).
        on_reject: called with a :class:`FrameError` kind for every dropped message (metrics).
        validate: the full check of a message that would be accepted: raises :class:`FrameError`
            otherwise and may return a checked object (stored as :attr:`Message.checked`). The
            receiver applies it to duplicates before answering them; new messages are validated by
            the caller (the :class:`~quantpipe.runtime.inbox.Inbox` uses the same callback) before
            :meth:`accept`. Default: :func:`quantpipe.wire.check_message` for data messages.
        clock: monotonic seconds.
    """

    def __init__(self, ctx: zmq.Context, address: str, options: LinkOptions, *, stage: int,
                 on_reject: Callable[[str], None] = lambda kind: None,
                 validate: Callable[[Message], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.options = options
        self.stage = stage & 0xFFFF
        self.on_reject = on_reject
        self.validate: Callable[[Message], object] = validate or self.check_wire
        self.clock = clock
        self.incarnation = _incarnation()
        self.duplicates = 0
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_bytes + wire.HEADER_SIZE)
        self.sock.setsockopt(zmq.RCVHWM, 64)
        self.sock.setsockopt(zmq.SNDHWM, 1024)
        self.sock.bind(address)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._seen = _SeenSeqs(horizon=1 << 16)
        self._done = _SeenSeqs(horizon=1 << 16)
        # Accepted, not yet handed on: seq -> the routing id of the sender that holds it in custody.
        self._holders: dict[int, bytes] = {}
        self._peers: dict[bytes, list[float]] = {}  # routing id -> [last heard, last sent]
        self._last_log = 0.0
        self._suppressed = 0

    def peer_alive(self) -> bool:
        """Whether any sender was heard within ``peer_timeout_s`` (safe to call from another thread)."""
        now = self.clock()
        peers = tuple(self._peers.values())  # one atomic copy: the receiving thread may add peers meanwhile
        return any(now - heard < self.options.peer_timeout_s for heard, _ in peers)

    def _reject(self, kind: str, detail: str) -> None:
        self.on_reject(kind)
        now = self.clock()
        if now - self._last_log >= 5.0:  # rate-limited: a flood of garbage must not flood the log
            extra = f" (+{self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning("link %s: dropped a message (%s): %s%s", self.address, kind, detail, extra)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def _send(self, peer: bytes, frames: list) -> None:
        try:
            self.sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK)
            self._peers.setdefault(peer, [self.clock(), 0.0])[1] = self.clock()
        except zmq.ZMQError:
            pass  # peer gone or its queue full: it will time out and resend

    def receive(self, timeout_s: float) -> Message | None:
        """The next valid, new data or error message, or None after ``timeout_s``.

        Heartbeats are absorbed, valid duplicates are re-acked and dropped, malformed messages (and
        duplicates that fail :attr:`validate`) are counted and dropped.
        """
        deadline = self.clock() + timeout_s
        while True:
            self.service()
            wait_ms = max(0, int((deadline - self.clock()) * 1000))
            if not self.sock.poll(min(wait_ms, int(self.options.heartbeat_interval_s * 1000)), zmq.POLLIN):
                if self.clock() >= deadline:
                    return None
                continue
            parts = self.sock.recv_multipart(copy=False)
            msg = self._classify(parts)
            if msg is not None:
                return msg

    def _classify(self, parts: list) -> Message | None:
        peer, frames = parts[0].bytes, parts[1:]
        if not frames:
            self._reject("malformed", "empty message")
            return None
        try:
            header = wire.parse_header(frames[0].buffer, max_payload=self.options.max_message_bytes)
        except FrameError as exc:
            self._reject(exc.kind, str(exc))
            return None
        now = self.clock()
        self._peers.setdefault(peer, [now, 0.0])[0] = now
        if header.msg_type == wire.MsgType.HEARTBEAT:
            return None
        if header.msg_type in (wire.MsgType.ACK, wire.MsgType.DONE):
            self._reject("malformed", f"a {header.msg_type.name.lower()} arrived on a receiving link")
            return None
        if len(frames) < 2:
            self._reject("malformed", "data or error message without its trace frame")
            return None
        try:
            t_origin = wire.parse_trace(frames[-1].buffer)
        except FrameError as exc:
            self._reject(exc.kind, str(exc))
            return None
        body_frames = frames[:-1]
        nbytes = sum(len(f) for f in frames)
        body = b""
        if header.msg_type == wire.MsgType.ERROR:
            try:
                _, body = wire.decode_control([f.bytes for f in body_frames])
            except FrameError as exc:
                self._reject(exc.kind, str(exc))
                return None
        msg = Message(peer, header, body_frames, t_origin, nbytes, body=body, received_at=now)
        if header.seq in self._seen:
            self._answer_duplicate(msg)
            return None
        return msg

    def check_wire(self, msg: Message) -> None:
        """The default validation: a data message's frames are complete and intact (CRCs, lengths)."""
        if msg.header.msg_type == wire.MsgType.DATA:
            wire.check_message(msg.frames, max_payload=self.options.max_message_bytes)

    def _answer_duplicate(self, msg: Message) -> None:
        """A message with a seq already accepted: re-ack it (and re-DONE it, or move its custody to
        this sender) only if it is a frame that would be accepted. Anything else is rejected like any
        bad frame: a forged duplicate must never take custody of a microbatch or be answered."""
        try:
            self.validate(msg)
        except FrameError as exc:
            self._reject(exc.kind, f"microbatch {msg.header.seq} (a duplicate seq): {exc}")
            return
        seq, peer = msg.header.seq, msg.peer
        self.duplicates += 1
        self._ack(peer, seq)
        if seq in self._done:  # its DONE may have been lost: the sender would keep it forever
            self._send(peer, wire.encode_control(wire.MsgType.DONE, seq=seq, stage=self.stage,
                                                 first_id=self.incarnation))
        elif seq in self._holders:
            # Resent by a restarted sender (a new routing id): the DONE must go to the live one.
            self._holders[seq] = peer

    def accept(self, msg: Message) -> None:
        """Take the message into the data path: ack it (frees the sender's credit) and remember its seq.

        The sender keeps it in custody until :meth:`done` is called for the same seq."""
        self._seen.add(msg.header.seq)
        self._holders[msg.header.seq] = msg.peer
        self._ack(msg.peer, msg.header.seq)

    def reject(self, msg: Message, exc: FrameError) -> None:
        """Drop a message whose payload failed validation (not acked: a resend may arrive intact)."""
        self._reject(exc.kind, f"microbatch {msg.header.seq}: {exc}")

    def done(self, seq: int) -> None:
        """Tell the sender of accepted microbatch ``seq`` that it was handed on (acked downstream, or
        written by the sink): it may forget it. Unknown or already finished seqs are ignored."""
        peer = self._holders.pop(seq, None)
        if peer is None:
            return
        self._done.add(seq)
        self._send(peer, wire.encode_control(wire.MsgType.DONE, seq=seq, stage=self.stage, first_id=self.incarnation))

    @property
    def holding(self) -> int:
        """Microbatches accepted and not yet handed on (their sender still keeps them in custody)."""
        return len(self._holders)

    def _ack(self, peer: bytes, seq: int) -> None:
        self._send(peer, wire.encode_control(wire.MsgType.ACK, seq=seq, stage=self.stage, first_id=self.incarnation))

    def service(self) -> None:
        """Heartbeat peers we have not written to lately; forget peers silent for long."""
        now = self.clock()
        for peer, (heard, sent) in list(self._peers.items()):
            if now - heard > 10 * self.options.peer_timeout_s:
                del self._peers[peer]
            elif now - sent >= self.options.heartbeat_interval_s:
                self._send(peer, wire.encode_control(wire.MsgType.HEARTBEAT, stage=self.stage,
                                                     first_id=self.incarnation))

    def close(self, linger_s: float = 1.0) -> None:
        """Close, giving queued acks ``linger_s`` to leave (else the sender waits to resend them)."""
        self.sock.close(linger=int(linger_s * 1000))
