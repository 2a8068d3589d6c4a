"""A live stage daemon (a real `quantpipe stage` process) gets 100 000 bad messages interleaved with a
well-behaved source's stream, plus connections announcing frames over zmq.MAXMSGSIZE. It must stay up,
count every bad message under its kind in Prometheus (scraped over HTTP), log the flood rate-limited,
and answer every valid image correctly, exactly once."""

from __future__ import annotations

import collections
import time

import pytest
import zmq

from bench.chaos import Cluster, Setup, bad_messages, check_results, expected_top5, scrape_errors, send_oversized
from quantpipe.runtime.link import LinkOptions

N_BAD = 100_000
N_OVERSIZED = 20


def test_live_daemon_counts_and_survives_100k_bad_frames(tmp_path):
    setup = Setup(engines=("builtin:head:16",), count=400, rate=100.0, metrics=True)
    expected = expected_top5(setup)
    want = collections.Counter(kind for _, kind in bad_messages(N_BAD))
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVHWM, 1)  # we never read the heartbeats the daemon sends back
    raw.setsockopt(zmq.SNDTIMEO, 30_000)
    with Cluster(tmp_path, setup) as c:
        try:
            c.start()
            port, endpoint = c.metrics_ports[0], c.addresses[0]
            raw.connect(endpoint)
            t0 = time.monotonic()
            cut = 0
            for i, (frames, _) in enumerate(bad_messages(N_BAD)):
                raw.send_multipart(frames)  # blocks when the daemon's queue is full: backpressure, not loss
                if i == N_BAD // 2:
                    cut = send_oversized(endpoint, N_OVERSIZED, LinkOptions().max_message_bytes + 64)
            sent_s = time.monotonic() - t0
            deadline = time.monotonic() + 60
            while sum(scrape_errors(port).values()) < N_BAD and time.monotonic() < deadline:
                assert c.procs["stage0"].poll() is None, c.log_tail("stage0")
                time.sleep(0.1)
            counted_s = time.monotonic() - t0
            assert c.procs["sink"].wait(60) == 0, c.log_tail("sink")
            time.sleep(0.3)  # a straggler would show up as an extra count
            counted = scrape_errors(port)
            alive = c.procs["stage0"].poll() is None
            log = (tmp_path / "stage0.log").read_text()
        finally:
            raw.close(0)
            ctx.term()
    assert alive, "the daemon died under fuzzing"
    assert {k: int(v) for k, v in counted.items()} == dict(want)  # every bad message, under its own kind
    assert cut == N_OVERSIZED  # libzmq hung up on each oversized announcement; none reached Python
    figures = check_results(c.lines(), expected)
    assert (figures["lost"], figures["duplicated"], figures["errors"], figures["wrong"]) == (0, 0, 0, 0), figures
    # Rate-limited logging: at most one line per 5 s (plus the first), each saying how many it stood for.
    dropped = [line for line in log.splitlines() if "dropped a message" in line]
    assert 1 <= len(dropped) <= counted_s / 5 + 2, len(dropped)
    print(f"\nfuzz: {N_BAD} bad messages sent in {sent_s:.1f} s ({N_BAD / sent_s:.0f}/s), all counted after "
          f"{counted_s:.1f} s; {N_OVERSIZED} oversized connections cut; {len(dropped)} log lines; by kind {dict(want)}")
