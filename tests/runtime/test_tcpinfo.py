"""The kernel's acknowledged-byte counter under a real ZeroMQ DEALER (quantpipe.runtime.tcpinfo)."""

from __future__ import annotations

import sys
import time

import pytest
import zmq

from quantpipe.runtime.link import LinkOptions, LinkSender
from quantpipe.runtime.shaping import EmulatedLink
from quantpipe.runtime.tcpinfo import TcpProgress, tcp_progress_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO is Linux's")


def _until(cond, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 1)
    router.setsockopt(zmq.RCVBUF, 65536)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDBUF, 65536)
    progress = tcp_progress_for(dealer, f"tcp://127.0.0.1:{port}")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield ctx, router, dealer, progress
    progress.close()
    dealer.close()
    router.close()
    ctx.term()


def test_the_reading_of_a_tcp_socket_that_the_peer_does_not_drain():
    # A plain TCP pair, so that the peer really stops reading (libzmq's I/O thread would drain it)
    import socket

    from quantpipe.runtime.tcpinfo import _read_fd

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    tx = socket.create_connection(srv.getsockname())
    rx, _ = srv.accept()
    try:
        before, idle, _ = _read_fd(tx.fileno())
        assert not idle
        tx.setblocking(False)
        sent = 0
        try:
            while True:
                sent += tx.send(b"\x01" * (1 << 20))
        except BlockingIOError:
            pass  # every buffer on the way is full
        stuck, backlogged, _ = _read_fd(tx.fileno())
        assert backlogged and stuck - before < sent
        got = 0
        while got < sent:
            got += len(rx.recv(1 << 20))
        done = _until(lambda: (r := _read_fd(tx.fileno())) and not r[1] and r)
        assert done[0] - before == sent  # every byte acknowledged, nothing SACKed left over
    finally:
        tx.close()
        rx.close()
        srv.close()


def test_the_counter_under_a_zeromq_dealer_follows_what_the_peer_took(pair):
    _, router, dealer, progress = pair
    assert isinstance(progress, TcpProgress)

    def connected():
        progress.poll_events()
        return progress.fd is not None

    _until(connected)
    before, _ = progress.read(time.monotonic())
    payload = b"\x01" * (4 << 20)
    dealer.send(payload)
    frames = router.recv_multipart()
    assert len(frames[1]) == len(payload)
    done = _until(lambda: (r := progress.read(time.monotonic())) and not r[1] and r)
    assert done[0] - before >= len(payload)  # every byte (plus ZeroMQ's framing) acknowledged


def test_a_disconnection_forgets_the_descriptor(pair):
    _, router, _, progress = pair

    def connected():
        progress.poll_events()
        return progress.fd is not None

    _until(connected)
    router.close(linger=0)

    def forgotten():
        progress.poll_events()
        return progress.fd is None or progress.read(time.monotonic()) is None

    _until(forgotten)


def test_only_unshaped_tcp_links_read_the_counter():
    ctx = zmq.Context()
    try:
        ipc = ctx.socket(zmq.DEALER)
        assert tcp_progress_for(ipc, "ipc:///tmp/qp-none") is None
        ipc.close(linger=0)
        senders = [
            LinkSender(ctx, "tcp://127.0.0.1:1", LinkOptions(), stage=0),
            LinkSender(ctx, "tcp://127.0.0.1:1", LinkOptions(), stage=0, shaper=EmulatedLink(1e6, time.monotonic())),
            LinkSender(ctx, "tcp://127.0.0.1:1", LinkOptions(tcp_progress=False), stage=0),
        ]
        assert [s.tcp is not None for s in senders] == [True, False, False]
        for s in senders:
            s.pump(0.0)  # reads nothing while nothing is outstanding
            s.close()
    finally:
        ctx.term()


def test_an_emulated_link_reports_its_progress_as_tcp_would():
    link = EmulatedLink(1000.0, 0.0)
    assert link.release_time(500, 0.0) == 0.5
    assert link.release_time(1000, 0.2) == 1.5  # serialized after the first
    assert link.progress(0.25) == (250, True)
    assert link.progress(1.0) == (1000, True)  # the first crossed, half of the second
    assert link.progress(2.0) == (1500, False)
    link.set_rate(100.0, 2.0)
    assert link.release_time(100, 3.0) == 4.0
    assert link.progress(2.5) == (1500, False)  # idle until the next frame starts
    assert link.progress(3.5) == (1550, True)
