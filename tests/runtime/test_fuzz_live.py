"""A live stage daemon (a real `quantpipe stage` process) gets 100 000 bad messages interleaved with a
well-behaved source's stream, plus connections announcing frames over zmq.MAXMSGSIZE. It must stay up,
count every bad message under its kind in Prometheus (scraped over HTTP), log the flood rate-limited,
and answer every valid image correctly, exactly once."""

from __future__ import annotations

from bench.chaos import fuzz_live


def test_live_daemon_counts_and_survives_100k_bad_frames(tmp_path):
    r = fuzz_live(tmp_path, n_bad=100_000, n_oversized=20)
    print("\nfuzz:", {k: v for k, v in r.items() if k != "sent_by_kind"})
    assert r["daemon_alive"], "the daemon died under fuzzing"
    assert r["counted_by_kind"] == r["sent_by_kind"]  # every bad message, under its own kind, no more
    assert len(r["sent_by_kind"]) == 7  # length, magic, version, crc, malformed, inconsistent, oversized
    assert r["oversized_cut"] == 20  # libzmq hung up on each oversized announcement; none reached Python
    assert (r["valid_lost"], r["valid_duplicated"], r["valid_errors"], r["valid_wrong"]) == (0, 0, 0, 0), r
    assert r["sink_exit"] == 0
    # Rate-limited logging: one line per 5 s at most (plus the first), each saying how many it stood for.
    assert 1 <= r["log_lines"] <= r["counted_after_s"] / 5 + 2, r
