"""A stage's receiving side in its own thread: read, validate and acknowledge frames on arrival.

Why a thread: a stage daemon with one loop reads its inbound socket only between engine runs, so its
acknowledgements wait for its own compute. The upstream measures bandwidth from acknowledgements
(acknowledged bytes over the time it had unacknowledged data in flight), so a busy next stage would
look like a slow link and the upstream would drop its bitwidth for nothing. The :class:`Inbox` thread
acknowledges a frame as soon as it has arrived and passed validation, whatever the engine is doing
(onnxruntime, numpy's BLAS and ``time.sleep`` all release the GIL), so the upstream measures the link.

Acknowledging before the microbatch is handed on is safe because of custody
(:mod:`quantpipe.runtime.link`): the upstream keeps it until DONE and resends it if this process dies.
Memory stays bounded by the same rule: a legitimate upstream never has more than ``window + 2``
microbatches unacknowledged or in custody here, and the queue stops reading (leaving backpressure to the socket) at that
size, so even a sender that ignores credits cannot grow it.

ZeroMQ sockets are not thread-safe, so each socket belongs to one thread: the thread owns the
:class:`~quantpipe.runtime.link.LinkReceiver`'s ROUTER and one end of an inproc PAIR; the daemon's
loop owns the other end. Over the PAIR the thread wakes the loop (an empty message per queued
microbatch) and the loop sends DONE requests (an 8-byte seq) and commands.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import struct
import threading
from typing import Callable

import zmq

from quantpipe.errors import FrameError
from quantpipe.runtime.link import LinkReceiver, Message

__all__ = ["Inbox"]

log = logging.getLogger(__name__)

_SEQ = struct.Struct("<Q")
_PAUSE, _STOP = b"pause", b"stop"
_names = itertools.count()


class Inbox:
    """Receives on ``receiver`` in a thread; the owner takes validated, acknowledged messages in order.

    Args:
        ctx: the process's ZeroMQ context (for the inproc PAIR).
        receiver: the stage's inbound link; from :meth:`start` on only the thread touches its socket.
        capacity: most microbatches queued (acknowledged, not yet taken); at capacity the thread
            stops reading input until the owner takes one.
        validate: raises :class:`FrameError` for a data message that must not be acknowledged
            (the stage's full check of the frame); error reports are validated by the link already.
            What it returns, if not None, is kept as ``msg.checked``. It also checks duplicates
            before the receiver answers them (:attr:`LinkReceiver.validate`).
    """

    def __init__(self, ctx: zmq.Context, receiver: LinkReceiver, *, capacity: int,
                 validate: Callable[[Message], object]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.receiver = receiver
        self.capacity = capacity
        self.validate = validate
        # Duplicates are answered by the receiver itself, in this thread: with the same full check
        # as new frames, so that only a frame that would be accepted is re-acked or moves custody.
        receiver.validate = self._check
        self._queue: collections.deque[Message] = collections.deque()
        address = f"inproc://quantpipe-inbox-{os.getpid()}-{next(_names)}"
        self._mine = ctx.socket(zmq.PAIR)  # the owner's end
        self._mine.setsockopt(zmq.LINGER, 0)
        self._mine.bind(address)
        self._theirs = ctx.socket(zmq.PAIR)  # the thread's end
        self._theirs.setsockopt(zmq.LINGER, 0)
        self._theirs.connect(address)
        self._thread = threading.Thread(target=self._run, name="quantpipe-inbox", daemon=True)
        self.failed: BaseException | None = None

    # -- the owner's side ------------------------------------------------------------------------
    @property
    def socket(self) -> zmq.Socket:
        """Readable when a message may be waiting: register it with the owner's poller."""
        return self._mine

    def start(self) -> Inbox:
        self._thread.start()
        return self

    def take(self) -> Message | None:
        """The next acknowledged message, or None. Never blocks."""
        while True:  # the wake-ups only say "look"; the queue is the truth
            try:
                self._mine.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        try:
            msg = self._queue.popleft()
        except IndexError:
            return None
        if len(self._queue) >= self.capacity - 1:
            self._mine.send(b"")  # there is room again: the thread may resume reading
        return msg

    @property
    def queued(self) -> int:
        return len(self._queue)

    def done(self, seq: int) -> None:
        """Microbatch ``seq`` was handed on: have the thread tell its sender (DONE)."""
        self._mine.send(_SEQ.pack(seq))

    def pause(self) -> None:
        """Stop taking new input (shutdown); queued messages stay to be taken, DONEs still flow."""
        self._mine.send(_PAUSE)

    def close(self, linger_s: float = 1.0) -> None:
        """Stop the thread (it closes the receiver, giving queued DONEs ``linger_s`` to leave)."""
        if self._thread.is_alive():
            self._mine.send(_STOP)
            self._thread.join(10 + linger_s)
        elif not self._thread.ident:
            self.receiver.close(linger_s)  # never started: the socket is still ours to close
        self._mine.close(0)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        rx, pair = self.receiver, self._theirs
        both, pair_only = zmq.Poller(), zmq.Poller()
        both.register(rx.sock, zmq.POLLIN)
        both.register(pair, zmq.POLLIN)
        pair_only.register(pair, zmq.POLLIN)
        tick_ms = max(1, int(rx.options.heartbeat_interval_s * 1000))
        reading = True
        try:
            while True:
                rx.service()  # heartbeats upstream: alive however long the engine runs
                open_ = reading and len(self._queue) < self.capacity
                events = dict((both if open_ else pair_only).poll(tick_ms))
                if pair in events:
                    reading = self._commands(pair, reading)
                    if reading is None:
                        return
                if open_ and rx.sock in events:
                    self._read(rx)
        except BaseException as exc:  # surfaced by the owner's health facts; never silently lost
            self.failed = exc
            log.exception("inbox thread failed")
        finally:
            rx.close(1.0)
            pair.close(0)

    def _commands(self, pair: zmq.Socket, reading: bool) -> bool | None:
        while True:
            try:
                cmd = pair.recv(zmq.NOBLOCK)
            except zmq.Again:
                return reading
            if len(cmd) == _SEQ.size:
                self.receiver.done(_SEQ.unpack(cmd)[0])
            elif cmd == _PAUSE:
                reading = False
            elif cmd == _STOP:
                return None
            # b"": the owner made room in the queue; the next poll reads again

    def _check(self, msg: Message) -> object:
        checked = self.validate(msg)
        if checked is not None:
            msg.checked = checked  # validated once: the owner decodes from it
        return checked

    def _read(self, rx: LinkReceiver) -> None:
        while len(self._queue) < self.capacity:
            msg = rx.receive(0.0)
            if msg is None:
                return
            try:
                self._check(msg)
            except FrameError as exc:
                rx.reject(msg, exc)  # not acknowledged: a resend may arrive intact
                continue
            rx.accept(msg)  # the ACK leaves now: the upstream's bandwidth sample ends here
            self._queue.append(msg)
            self._theirs.send(b"")
