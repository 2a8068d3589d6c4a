"""Links over real loopback sockets: acks and credits, dedup, resend after a receiver restart,
heartbeats, and a live receiver that survives malformed traffic."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from quantpipe import wire
from quantpipe.runtime.link import LinkOptions, LinkReceiver, LinkSender

FAST = LinkOptions(window=2, resend_timeout_s=0.2, resend_backoff_max_s=1.0, heartbeat_interval_s=0.1,
                   peer_timeout_s=0.5, max_message_bytes=1 << 20)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _frames(seq: int, n: int = 64) -> list:
    x = np.full((1, n), seq, dtype=np.float32)
    return wire.encode_frame(x, seq=seq, first_id=seq, stage=0) + [wire.pack_trace(time.time())]


def _receive(rx: LinkReceiver, tx: LinkSender | None = None, timeout_s: float = 3.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tx is not None:
            tx.pump(0.01)
        msg = rx.receive(0.02)
        if msg is not None:
            return msg
    raise AssertionError("nothing received")


def _until(cond, tx: LinkSender, timeout_s: float = 3.0, rx: LinkReceiver | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        tx.pump(0.01)
        if rx is not None:
            rx.service()


def _raw_peer(ctx, rx, recv_timeout_ms: int | None = None):
    """A bare DEALER connected to ``rx``: sends whatever a test hands it, no link protocol."""
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    if recv_timeout_ms is not None:
        raw.setsockopt(zmq.RCVTIMEO, recv_timeout_ms)
    raw.connect(rx.endpoint)
    return raw


def test_acks_return_credits_and_bound_the_window(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    tx = LinkSender(ctx, rx.endpoint, FAST, stage=0, policy_window=2)
    try:
        tx.send(_frames(0), seq=0, images=1)
        tx.send(_frames(1), seq=1, images=1)
        assert not tx.has_credit() and tx.in_flight == 2
        with pytest.raises(RuntimeError):
            tx.send(_frames(2), seq=2, images=1)  # no credit: the window bounds data in flight
        first = _receive(rx, tx)
        assert first.header.seq == 0 and first.t_origin > 0
        header, x = wire.decode_frame(first.frames)
        assert x[0, 0] == 0
        rx.accept(first)
        _until(tx.has_credit, tx)
        rx.accept(_receive(rx, tx))
        _until(lambda: tx.in_flight == 0, tx)
        windows = tx.take_windows()  # two acks close one window of two microbatches
        assert len(windows) == 1 and windows[0].images == 2 and windows[0].bandwidth > 0
    finally:
        tx.close()
        rx.close(0)


def test_duplicates_are_dropped_and_acked_again(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    raw = _raw_peer(ctx, rx, recv_timeout_ms=2000)
    try:
        raw.send_multipart(_frames(7))
        msg = _receive(rx)
        rx.accept(msg)
        raw.send_multipart(_frames(7))  # a resend of what was already accepted
        raw.send_multipart(_frames(8))
        assert _receive(rx).header.seq == 8  # 7 is not delivered twice
        assert rx.duplicates == 1
        acks = [wire.decode_control(raw.recv_multipart())[0] for _ in range(2)]
        acks = [h for h in acks if h.msg_type == wire.MsgType.ACK]
        assert [h.seq for h in acks] == [7, 7][: len(acks)] and acks
    finally:
        raw.close()
        rx.close(0)


def test_receiver_restart_triggers_resend_of_unacked(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    endpoint = rx.endpoint
    tx = LinkSender(ctx, endpoint, FAST, stage=0)
    try:
        tx.send(_frames(0), seq=0, images=1)
        tx.send(_frames(1), seq=1, images=1)
        first = _receive(rx, tx)
        rx.accept(first)  # seq 0 accepted ...
        rx.done(0)  # ... and handed on; seq 1 dies with the receiver
        _until(lambda: tx.in_flight == 1 and tx.in_custody == 0, tx)
        rx.close(0)
        for _ in range(50):  # the closed socket releases its port asynchronously
            try:
                rx = LinkReceiver(ctx, endpoint, FAST, stage=1)  # restarted: new incarnation, same address
                break
            except zmq.ZMQError:
                time.sleep(0.05)
        msg = _receive(rx, tx, timeout_s=5.0)
        assert msg.header.seq == 1 and tx.resends >= 1
        rx.accept(msg)
        _until(lambda: tx.in_flight == 0, tx)
    finally:
        tx.close()
        rx.close(0)


def _restart(rx: LinkReceiver, ctx) -> LinkReceiver:
    endpoint = rx.endpoint
    rx.close(0)
    for _ in range(50):  # the closed socket releases its port asynchronously
        try:
            return LinkReceiver(ctx, endpoint, FAST, stage=1)
        except zmq.ZMQError:
            time.sleep(0.05)
    raise AssertionError(f"could not bind {endpoint} again")


def test_acked_but_not_handed_on_is_kept_in_custody_and_resent_after_a_restart(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    tx = LinkSender(ctx, rx.endpoint, FAST, stage=0, policy_window=1)
    try:
        for seq in (0, 1):
            tx.send(_frames(seq), seq=seq, images=1)
        for _ in (0, 1):
            rx.accept(_receive(rx, tx))  # both received (acked) ...
        rx.done(0)  # ... only seq 0 handed on
        _until(lambda: tx.in_flight == 0 and tx.in_custody == 1, tx)
        assert len(tx.take_windows()) == 2  # the ack, not the DONE, is the bandwidth sample
        rx = _restart(rx, ctx)  # seq 1 dies with the receiver that held it
        msg = _receive(rx, tx, timeout_s=5.0)
        assert msg.header.seq == 1 and tx.in_custody == 0
        rx.accept(msg)
        rx.done(1)
        _until(lambda: tx.in_flight == 0 and tx.in_custody == 0, tx)
        assert tx.take_windows() == []  # a resend is no second bandwidth sample
        assert tx.drain(1.0)
    finally:
        tx.close()
        rx.close(0)


def test_done_goes_to_the_sender_that_resent_after_its_own_restart(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    old = LinkSender(ctx, rx.endpoint, FAST, stage=0)
    new = LinkSender(ctx, rx.endpoint, FAST, stage=0)
    try:
        old.send(_frames(5), seq=5, images=1)
        rx.accept(_receive(rx, old))
        old.close()  # the sender dies; its replacement resends what it cannot know was taken
        new.send(_frames(5), seq=5, images=1)
        deadline = time.monotonic() + 3
        while rx.duplicates == 0 and time.monotonic() < deadline:
            new.pump(0.01)
            assert rx.receive(0.02) is None  # dropped as a duplicate (and acked to the new sender)
        _until(lambda: new.in_custody == 1, new)
        rx.done(5)
        _until(lambda: new.in_custody == 0 and new.in_flight == 0, new)
    finally:
        new.close()
        rx.close(0)


def test_heartbeats_tell_a_busy_peer_from_a_dead_one(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    tx = LinkSender(ctx, rx.endpoint, FAST, stage=0)
    try:
        tx.send(_frames(0), seq=0, images=1)
        _receive(rx, tx)  # received but never accepted: the receiver is "busy"
        _until(tx.peer_alive, tx, rx=rx)
        # Busy but heartbeating: no resends however long the ack takes.
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            tx.pump(0.02)
            rx.service()
        assert tx.peer_alive() and tx.resends == 0
        rx.close(0)  # now dead: silence past peer_timeout (the sender keeps pumping, as a daemon does)
        deadline = time.monotonic() + FAST.peer_timeout_s + 0.1
        while time.monotonic() < deadline:
            tx.pump(0.02)
        assert not tx.peer_alive()
    finally:
        tx.close()


def test_live_receiver_survives_malformed_traffic(ctx):
    rejected: dict[str, int] = {}

    def count(kind: str) -> None:
        rejected[kind] = rejected.get(kind, 0) + 1

    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1, on_reject=count)
    raw = _raw_peer(ctx, rx)
    good = _frames(3)
    bad_crc = bytearray(good[0])
    bad_crc[20] ^= 1
    try:
        garbage = [[b"junk"], [b"QPIP" + b"\0" * 60, b"x"], [b"XXXX" + b"\0" * 60], [bytes(bad_crc), *good[1:]], good[:2],
                   [*good[:2], b"short"], wire.encode_control(wire.MsgType.ACK, seq=1)]
        for _ in range(50):
            for g in garbage:
                raw.send_multipart(g)
        raw.send_multipart(good)
        msg = _receive(rx, timeout_s=10.0)
        assert msg.header.seq == 3  # valid traffic still flows after 350 bad messages
        assert sum(rejected.values()) == 50 * len(garbage)
        assert set(rejected) == {"length", "version", "magic", "crc", "malformed"}
    finally:
        raw.close()
        rx.close(0)


def test_oversized_frames_are_cut_off_by_the_socket(ctx):
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    raw = _raw_peer(ctx, rx)
    try:
        raw.send_multipart([b"\0" * 64, b"\0" * (FAST.max_message_bytes + 1024)])  # over zmq.MAXMSGSIZE
        assert rx.receive(0.5) is None  # libzmq dropped the connection; nothing reached Python
        tx = LinkSender(ctx, rx.endpoint, FAST, stage=0)
        tx.send(_frames(1), seq=1, images=1)
        assert _receive(rx, tx).header.seq == 1  # other peers are unaffected
        tx.close()
    finally:
        raw.close()
        rx.close(0)


def test_windows_nobody_takes_are_bounded(ctx):
    # The source and the serve bridge never take their bandwidth windows: a server that runs for days
    # must not keep every window it ever closed.
    rx = LinkReceiver(ctx, "tcp://127.0.0.1:*", FAST, stage=1)
    tx = LinkSender(ctx, rx.endpoint, FAST, stage=0, policy_window=1)
    try:
        for seq in range(80):
            _until(tx.has_credit, tx)
            tx.send(_frames(seq), seq=seq, images=1)
            msg = _receive(rx, tx)
            rx.accept(msg)
            rx.done(msg.header.seq)
        _until(lambda: tx.in_flight == 0, tx)
        windows = tx.take_windows()
        assert 60 <= len(windows) <= 64 and windows[-1].images == 1  # the latest ones, at most 64
        assert tx.take_windows() == []
    finally:
        tx.close()
        rx.close(0)
