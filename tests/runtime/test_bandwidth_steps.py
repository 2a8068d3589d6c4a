"""A step of the link closes the bandwidth window early (issue 12.5), and settling is judged by the
output rate (quantpipe.runtime.timeline.output_settle). Deterministic: times are passed in."""

from __future__ import annotations

from quantpipe.runtime.bandwidth import BandwidthEstimator
from quantpipe.runtime.timeline import output_settle

FRAME = 1_210_000  # a 32-bit microbatch of 8 [197, 192] images, bytes


def _stream(est: BandwidthEstimator, rates: list[float], t: float = 0.0, nbytes: int = FRAME, bits: int = 32):
    """One frame at a time on a link of ``rates[i]`` bytes/s; returns (closed windows, end time)."""
    closed = []
    for rate in rates:
        est.on_send(t)
        t += nbytes / rate
        stats = est.on_ack(t, nbytes, 8, bits, FRAME)
        if stats is not None:
            closed.append(stats)
    return closed, t


def test_a_collapse_closes_the_window_at_the_first_slow_frame_with_the_new_rate():
    est = BandwidthEstimator(window=10, max_window_s=5.3)
    first, t = _stream(est, [6.05e6] * 10)  # 48.4 Mbit/s
    assert len(first) == 1 and abs(first[0].bandwidth - 6.05e6) < 1e3 and not first[0].closed_early
    closed, _ = _stream(est, [6.05e6 / 20, 6.05e6 / 20], t)  # 2.42 Mbit/s: 4 s per frame
    assert closed and closed[0].closed_early and closed[0].microbatches == 1
    assert abs(closed[0].bandwidth - 6.05e6 / 20) < 1e3  # the new rate alone, not a blend
    assert est.estimate == closed[0].bandwidth


def test_a_faster_link_restarts_the_window_so_it_measures_the_new_link_alone():
    est = BandwidthEstimator(window=10)
    _, t = _stream(est, [0.75e6] * 10)
    closed, t = _stream(est, [0.75e6] * 4 + [6e6] * 2, t)  # the step comes mid-window
    assert closed == []  # nothing urgent: no early close on a faster link
    closed, _ = _stream(est, [6e6] * 8, t)  # 2 + 8 acks on the new link
    assert len(closed) == 1 and closed[0].microbatches == 10 and not closed[0].closed_early
    assert abs(closed[0].bandwidth - 6e6) < 1e3  # not blended with the 4 slow frames before the step


def test_noise_on_a_steady_link_does_not_close_windows_early():
    est = BandwidthEstimator(window=10)
    # short frames, +-40 % jitter and one frame delayed 3x (too short to count on its own)
    rates = [6e6 * (1 + 0.4 * ((i * 7) % 3 - 1)) for i in range(40)]
    rates[15] = 2e6
    closed, _ = _stream(est, rates, nbytes=60_000, bits=2)
    assert [w.closed_early for w in closed] == [False] * 4


def test_output_settle_is_when_the_output_keeps_up_again():
    # 30 img/s in microbatches of 8; nothing from 10 s to 12.5 s (the link collapsed); then 30 img/s again
    times = [i * 8 / 30 for i in range(38)] + [12.5 + i * 8 / 30 for i in range(30)]
    times = [t for t in times for _ in range(8)]
    s = output_settle(times, 10.0, 20.0, 30.0, slack_images=8)
    assert s is not None and 2.2 <= s <= 2.6, s
    assert output_settle(times, 0.0, 10.0, 30.0, slack_images=8) == 0.0
    assert output_settle([t for t in times if t < 12], 10.0, 20.0, 30.0, slack_images=8) is None  # never back
