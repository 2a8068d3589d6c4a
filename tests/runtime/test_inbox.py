"""The receiving thread: frames are acked on arrival while the owner is busy, bad ones are not acked,
the queue is bounded, and DONE requests from the owner reach the sender."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from quantpipe import wire
from quantpipe.errors import FrameError
from quantpipe.runtime.inbox import Inbox
from quantpipe.runtime.link import LinkOptions, LinkReceiver, LinkSender

FAST = LinkOptions(window=3, heartbeat_interval_s=0.05, peer_timeout_s=0.5, max_message_bytes=1 << 20)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _frames(seq: int, crc: bool = False) -> list:
    x = np.full((1, 256), seq, dtype=np.float32)
    return wire.encode_frame(x, seq=seq, first_id=seq, stage=0, payload_crc=crc) + [wire.pack_trace(time.time())]


def _validate(msg) -> None:
    wire.check_frame(msg.frames)


def _pump_until(cond, tx: LinkSender, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        tx.pump(0.01)


def test_frames_are_acked_while_the_owner_is_busy_and_done_flows_back(ctx):
    rejected: list[str] = []
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1, on_reject=rejected.append)
    inbox = Inbox(ctx, rx, capacity=FAST.window + 2, validate=_validate).start()
    tx = LinkSender(ctx, rx.endpoint, FAST, stage=0)
    try:
        for seq in range(3):
            tx.send(_frames(seq), seq=seq, images=1)
        # Nobody takes anything: the thread alone acks them, so the sender's window frees up.
        # (The ack leaves just before the message is queued: the owner's DONE must find it accepted.)
        _pump_until(lambda: tx.in_flight == 0 and tx.in_custody == 3 and inbox.queued == 3, tx)
        corrupt = _frames(3, crc=True)
        corrupt[1] = bytes(corrupt[1][:-1]) + bytes([corrupt[1][-1] ^ 1])
        tx.send(corrupt, seq=3, images=1)
        _pump_until(lambda: rejected == ["crc"], tx)
        assert tx.in_flight == 1 and inbox.queued == 3  # not acked: a resend may arrive intact
        assert [inbox.take().header.seq for _ in range(3)] == [0, 1, 2] and inbox.take() is None
        inbox.done(1)
        _pump_until(lambda: tx.in_custody == 2, tx)
    finally:
        tx.close()
        inbox.close(0)


def test_the_queue_stops_reading_at_capacity(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    inbox = Inbox(ctx, rx, capacity=2, validate=_validate).start()
    raw = ctx.socket(zmq.DEALER)  # a sender that ignores credits
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(rx.endpoint)
    try:
        for seq in range(6):
            raw.send_multipart(_frames(seq))
        time.sleep(0.3)
        assert inbox.queued == 2  # the rest waits in the socket, unacked: backpressure, not memory
        got = []
        deadline = time.monotonic() + 3
        while len(got) < 6 and time.monotonic() < deadline:
            msg = inbox.take()
            if msg is None:
                inbox.socket.poll(50)
            else:
                got.append(msg.header.seq)
                assert inbox.queued <= 2
        assert got == list(range(6))
    finally:
        raw.close(0)
        inbox.close(0)


def test_check_frame_refuses_what_decode_frame_refuses():
    good = _frames(1, crc=True)[:-1]
    assert wire.check_frame(good).seq == 1
    for bad, kind in ((good[:1], "malformed"), ([good[0], good[1][:-4], good[2]], "length"),
                      ([good[0], good[1], b"\0\0\0\0"], "crc")):
        for fn in (wire.check_frame, wire.decode_frame):
            with pytest.raises(FrameError) as info:
                fn(bad)
            assert info.value.kind == kind
