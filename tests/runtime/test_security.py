"""CURVE on real loopback sockets: the allow-listed client talks; a client with another key, without
CURVE, or trusting another server key gets nothing through; plaintext bytes cannot be injected; the
real links (LinkSender/LinkReceiver) work unchanged over a SecureContext; keys never reach the logs."""

from __future__ import annotations

import logging
import socket
import time

import numpy as np
import pytest
import zmq

from quantpipe import wire
from quantpipe.runtime import keys, security
from quantpipe.runtime.link import LinkOptions, LinkReceiver, LinkSender

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

FAST = LinkOptions(window=2, resend_timeout_s=0.2, resend_backoff_max_s=1.0, heartbeat_interval_s=0.1,
                   peer_timeout_s=0.5, max_message_bytes=1 << 20)


@pytest.fixture
def keydir(tmp_path):
    for name in ("source", "stage0", "sink", "intruder"):
        keys.generate(tmp_path, name)
    return tmp_path


@pytest.fixture
def plain():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def server(keydir):
    """A CURVE ROUTER (stage0's key) that allows only the source's key."""
    ctx = security.SecureContext(security.CurveServer.from_files(keydir / "stage0.key_secret", [keydir / "source.key"]),
                                 None)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield ctx, sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(0)
    ctx.term()


def _client(keydir, secret: str, server_pub: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = security.SecureContext(None, security.CurveClient.from_files(keydir / secret, keydir / server_pub))
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    return ctx, sock


def _nothing_arrives(sock: zmq.Socket, seconds: float = 0.5) -> bool:
    # An allowed handshake and message take milliseconds on loopback (see the first test).
    return sock.poll(int(seconds * 1000), zmq.POLLIN) == 0


def test_allow_listed_client_talks_both_ways(keydir, server):
    ctx, router, endpoint = server
    cctx, dealer = _client(keydir, "source.key_secret", "stage0.key")
    try:
        dealer.connect(endpoint)
        dealer.send_multipart([b"hello", b"world"])
        assert router.poll(3000)
        peer, *msg = router.recv_multipart()
        assert msg == [b"hello", b"world"]
        router.send_multipart([peer, b"ack"])
        assert dealer.poll(3000) and dealer.recv_multipart() == [b"ack"]
        assert ctx.allow_lists[0].accepted == 1 and ctx.denied() == 0
    finally:
        dealer.close(0)
        cctx.term()


def test_client_with_a_key_not_allow_listed_gets_nothing_through(keydir, server):
    ctx, router, endpoint = server
    cctx, dealer = _client(keydir, "intruder.key_secret", "stage0.key")  # knows the server key, not allowed
    try:
        dealer.connect(endpoint)
        for i in range(20):
            dealer.send_multipart(wire.encode_control(wire.MsgType.HEARTBEAT, seq=i), flags=zmq.NOBLOCK)
        assert _nothing_arrives(router)
        deadline = time.monotonic() + 3
        while ctx.denied() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ctx.denied() >= 1  # the ZAP handler saw it and said no
    except zmq.Again:
        pass  # libzmq may refuse to queue at all: just as good, nothing got through
    finally:
        dealer.close(0)
        cctx.term()
    assert _nothing_arrives(router, 0.2)


def test_client_without_curve_gets_nothing_through(server, plain):
    _, router, endpoint = server
    dealer = plain.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    frames = wire.encode_frame(np.ones((1, 8), np.float32), seq=0, first_id=0, stage=0) + [wire.pack_trace(time.time())]
    for _ in range(20):
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            break  # no completed handshake, nowhere to queue: nothing can get through
    assert _nothing_arrives(router)
    dealer.close(0)


def test_client_trusting_another_server_key_gets_nothing_through(keydir, server):
    _, router, endpoint = server
    cctx, dealer = _client(keydir, "source.key_secret", "sink.key")  # a man in the middle would hold this
    try:
        dealer.connect(endpoint)
        for _ in range(20):
            try:
                dealer.send(b"x", flags=zmq.NOBLOCK)
            except zmq.Again:
                break
        assert _nothing_arrives(router)
    finally:
        dealer.close(0)
        cctx.term()


def test_plaintext_bytes_cannot_be_injected(server):
    """A raw TCP peer speaking ZMTP 3.0 with the NULL mechanism, then a frame: rejected at the greeting."""
    _, router, endpoint = server
    host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + b"\0" * 31
    ready = b"\x04\x1a\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"
    payload = wire.encode_control(wire.MsgType.HEARTBEAT)[0]
    frame = b"\x00" + bytes([len(payload)]) + payload
    with socket.create_connection((host, int(port)), timeout=2) as s:
        try:
            s.sendall(greeting + ready + frame * 50)
            s.sendall(frame * 50)
        except OSError:
            pass  # the server may have hung up already
        assert _nothing_arrives(router)


def test_real_links_work_over_curve_and_refuse_an_injector(keydir, plain):
    """LinkSender/LinkReceiver unchanged, on SecureContexts: data and acks flow; a plaintext DEALER
    injecting valid-looking frames is never seen (no reject counted: nothing reached Python)."""
    rejected: list[str] = []
    rx_ctx = security.context(keydir, 0, 1)  # stage0 of a one-stage pipeline: allows 'source'
    tx_ctx = security.context(keydir, -1, 1)  # the source: trusts stage0's key
    rx = LinkReceiver(rx_ctx, "tcp://127.0.0.1:*", FAST, stage=0, on_reject=rejected.append)
    tx = LinkSender(tx_ctx, rx.endpoint, FAST, stage=wire.SOURCE_STAGE)
    evil = plain.socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    evil.connect(rx.endpoint)
    try:
        for seq in range(5):
            x = np.full((1, 16), seq, np.float32)
            tx.wait_credit()
            tx.send(wire.encode_frame(x, seq=seq, first_id=seq, stage=wire.SOURCE_STAGE) + [wire.pack_trace(time.time())],
                    seq=seq, images=1)
            try:  # it never completes a handshake, so libzmq may refuse to even queue: also a pass
                evil.send_multipart(wire.encode_frame(x + 100, seq=1000 + seq, first_id=0, stage=wire.SOURCE_STAGE)
                                    + [wire.pack_trace(time.time())], flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            deadline = time.monotonic() + 5
            msg = None
            while msg is None and time.monotonic() < deadline:
                tx.pump(0.01)
                msg = rx.receive(0.02)
            assert msg is not None and msg.header.seq == seq
            _, y = wire.decode_frame(msg.frames)
            assert np.all(y == seq)
            rx.accept(msg)
            rx.done(seq)  # handed on at once: custody (and the DONE) flows back over CURVE too
        deadline = time.monotonic() + 5
        while (tx.in_flight or tx.in_custody) and time.monotonic() < deadline:  # acks and DONEs came back
            tx.pump(0.02)
            rx.service()
        assert tx.in_flight == 0 and tx.in_custody == 0
        assert rx.receive(0.5) is None and not rejected
    finally:
        evil.close(0)
        tx.close()
        rx.close(0)
        tx_ctx.term()
        rx_ctx.term()


def test_keys_never_reach_the_logs(keydir, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = [keys.load_keypair(keydir / f"{n}.key_secret") for n in ("source", "stage0", "intruder")]
    ctx = security.context(keydir, 0, 1)
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    clients = [_client(keydir, f"{n}.key_secret", "stage0.key") for n in ("source", "intruder")]
    try:
        for _, dealer in clients:
            dealer.connect(endpoint)
            dealer.send(b"x", flags=zmq.NOBLOCK)
        assert router.poll(3000)
        router.recv_multipart()
        deadline = time.monotonic() + 3
        while ctx.denied() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(keys.KeyFileError):
            security.for_process(keydir, 5, 6)  # missing key file: an error path that names files
    finally:
        for cctx, dealer in clients:
            dealer.close(0)
            cctx.term()
        router.close(0)
        ctx.term()
    text = caplog.text
    assert "refused a CURVE client" in text  # the denial was logged ...
    assert any(r.name.endswith(".zap") for r in caplog.records)  # ... and so was pyzmq's own ZAP chatter
    for pair in secrets:  # ... without a single key in it
        assert pair.secret.decode() not in text and pair.public.decode() not in text


@pytest.mark.slow
def test_secured_pipeline_of_real_processes_refuses_injected_frames(tmp_path):
    """`keys_dir` in the config: every link is CURVE. Intruders (plaintext, and CURVE with a key nobody
    allow-listed) flood both stages with well-formed frames whose sequence numbers the real stream
    will use, before and during it: had one been accepted, the real microbatch would be dropped as
    a duplicate and a wrong result written."""
    from bench.chaos import Cluster, Setup, check_results, expected_top5

    keydir = tmp_path / "keys"
    for name in ("source", "stage0", "stage1", "sink", "intruder"):
        keys.generate(keydir, name)
    setup = Setup(engines=("builtin:linear", "builtin:head:16"), count=200, rate=200.0,
                  extra={"keys_dir": str(keydir)})
    expected = expected_top5(setup)
    plain_ctx = zmq.Context()
    # The intruder knows each stage's public key (public keys are public), just is not allow-listed.
    intruder_ctxs = [security.SecureContext(None, security.CurveClient.from_files(keydir / "intruder.key_secret",
                                                                                  keydir / f"stage{k}.key"))
                     for k in (0, 1)]
    socks = []
    with Cluster(tmp_path / "run", setup) as c:
        try:
            c.spawn("sink")
            for k in (1, 0):
                c.spawn(f"stage{k}")
            for k in (0, 1):
                c.wait_ready(f"stage{k}", 1)
            for k, address in enumerate(c.addresses):
                for ctx in (plain_ctx, intruder_ctxs[k]):
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(address)
                    socks.append(s)

            def inject() -> None:
                for seq in range(50):
                    forged = wire.encode_frame(np.full((4, *setup.input_shape), 1e3, np.float32), seq=seq,
                                               first_id=4 * seq, stage=wire.SOURCE_STAGE)
                    for s in socks:
                        try:
                            s.send_multipart(forged + [wire.pack_trace(time.time())], flags=zmq.NOBLOCK)
                        except zmq.Again:
                            pass  # no completed handshake, nowhere to queue

            inject()
            c.spawn("source")
            inject()
            assert c.procs["sink"].wait(60) == 0, c.log_tail("sink")
        finally:
            for s in socks:
                s.close(0)
            plain_ctx.term()
            for ctx in intruder_ctxs:
                ctx.term()
    figures = check_results(c.lines(), expected)
    assert (figures["lost"], figures["duplicated"], figures["wrong"], figures["errors"]) == (0, 0, 0, 0), figures
    logs = "".join(p.read_text() for p in (tmp_path / "run").glob("*.log"))
    assert "refused a CURVE client" in logs  # the allow-list said no to the intruder's key
    for name in ("source", "stage0", "stage1", "sink", "intruder"):
        pair = keys.load_keypair(keydir / f"{name}.key_secret")
        assert pair.secret.decode() not in logs and pair.public.decode() not in logs
