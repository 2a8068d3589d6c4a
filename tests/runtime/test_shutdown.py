"""Graceful shutdown and a stalled downstream, with real processes.

* SIGTERM to a stage mid-stream: it stops taking input, hands on what it accepted, waits for the acks
  and exits 0. Restarted, the stream completes with nothing lost or duplicated (anything it had
  accepted but dropped would leave a gap).
* The sink frozen with SIGSTOP: the source and every stage stop at their credit windows, so their
  resident memory stays flat however long the stall lasts; thawed, the stream completes exactly once.
"""

from __future__ import annotations

import signal
import time

import pytest

from bench.chaos import Cluster, Setup, chaos_stream, check_results, expected_top5, rss_kib

pytestmark = pytest.mark.slow


def test_sigterm_drains_in_flight_microbatches_and_exits_0(tmp_path):
    setup = Setup(engines=("builtin:linear", "builtin:head:16"), count=600, rate=200.0)
    targets = [("stage0", None)]  # the first stage: a live downstream to drain into, a source to resend
    figures = chaos_stream(tmp_path, targets, setup, sig=signal.SIGTERM, resume_timeout_s=10.0, settle_s=10.0)
    print("\nshutdown:", figures["kills"])
    for kill in figures["kills"]:
        assert kill["exit_code"] == 0, kill
        assert kill["stopped_after_s"] < 5.0, kill  # drained promptly: nothing was waiting on a dead peer
    assert (figures["lost"], figures["duplicated"], figures["wrong"]) == (0, 0, 0), figures
    assert figures["sink_exit"] == 0


def test_stalled_sink_keeps_upstream_memory_bounded(tmp_path):
    # 48 KiB per image, 8 per microbatch (~400 KB): offered at 400 img/s, an unbounded queue anywhere
    # would grow by ~19 MB/s while the sink is frozen.
    setup = Setup(engines=("builtin:identity", "builtin:head:16"), input_shape=(64, 192), count=1600, rate=400.0,
                  microbatch=8, credits=4)
    expected = expected_top5(setup)
    with Cluster(tmp_path, setup) as c:
        c.start()
        while len(c.lines()) < 200:
            assert c.procs["sink"].poll() is None, c.log_tail("sink")
            time.sleep(0.02)
        c.kill("sink", signal.SIGSTOP)
        watched = ["source", "stage0", "stage1"]
        samples: dict[str, list[int]] = {n: [] for n in watched}
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            for n in watched:
                samples[n].append(rss_kib(c.procs[n].pid))
            time.sleep(0.1)
        stalled_at = len(c.lines())
        c.kill("sink", signal.SIGCONT)
        assert c.procs["sink"].wait(60) == 0, c.log_tail("sink")
        figures = check_results(c.lines(), expected)
    mb_kib = setup.microbatch * 64 * 192 * 4 // 1024
    for n, rss in samples.items():
        settled = rss[len(rss) // 3:]  # after the windows filled
        growth = max(settled) - settled[0]
        print(f"\n{n}: RSS {rss[0] // 1024} -> {max(rss) // 1024} MiB during the stall (growth after fill "
              f"{growth} KiB; a microbatch is {mb_kib} KiB)")
        assert growth < 3 * mb_kib, (n, rss)  # flat: ~19 MB/s of offered input went nowhere
        assert max(rss) - rss[0] < (2 * setup.credits + 4) * mb_kib + 16 * 1024, (n, rss)
    assert stalled_at < setup.count and figures["lost"] == 0 and figures["duplicated"] == 0 and figures["wrong"] == 0, figures
