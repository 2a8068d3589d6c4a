"""A step of the link closes the bandwidth window early (issue 12.5), and settling is judged by the
output rate (quantpipe.runtime.timeline.output_settle). Deterministic: times are passed in.

The frame that is on the link when it steps blends the two rates. On a collapse it is only an upper
bound of the new rate (the policy waits one frame for a measurement of the new link alone); on a rise
it is left out of the restarted window. The last test drives the estimator and the policy with a
simulated paced stage on the issue's link (48.4 -> 6.05 -> 48.4 -> 2.42 Mbit/s) at many phases of the
step against the frames."""

from __future__ import annotations

import pytest

from quantpipe.runtime.bandwidth import BandwidthEstimator
from quantpipe.runtime.policy import PaperPolicy
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
    closed, _ = _stream(est, [6e6] * 9, t)  # the window restarted from the second fast frame: 1 + 9 acks
    assert len(closed) == 1 and closed[0].microbatches == 10 and not closed[0].closed_early
    assert abs(closed[0].bandwidth - 6e6) < 1e3  # not blended with the 4 slow frames before the step


def _straddler(est: BandwidthEstimator, t: float, old: float, new: float, fraction_old: float,
               nbytes: int = FRAME, bits: int = 32):
    """One frame of which ``fraction_old`` crossed at ``old`` bytes/s before the link stepped to ``new``."""
    est.on_send(t)
    t += fraction_old * nbytes / old + (1 - fraction_old) * nbytes / new
    return est.on_ack(t, nbytes, 8, bits, FRAME), t


def test_a_frame_that_straddled_a_rise_is_left_out_of_the_restarted_window():
    # 4-bit frames on 6.05 Mbit/s; the link rises 8x when 10 % of a frame has crossed. That frame comes
    # out 4.7x faster than the estimate (so it passes for a fast one) but 1.7x slower than the new link.
    small = FRAME // 8
    est = BandwidthEstimator(window=10)
    _, t = _stream(est, [0.756e6] * 10, nbytes=small, bits=4)
    stats, t = _straddler(est, t, 0.756e6, 6.05e6, 0.1, nbytes=small, bits=4)
    assert stats is None
    closed, _ = _stream(est, [6.05e6] * 10, t, nbytes=small, bits=4)
    assert len(closed) == 1 and closed[0].microbatches == 10
    # Before: the restart kept the straddler (42 ms) with nine frames of 25 ms and measured 5.65e6, 6.5 %
    # low: with the 15 % upgrade margin the policy stopped at 16 on the way from 4 to 32 at some phases.
    assert closed[0].bandwidth == pytest.approx(6.05e6, rel=1e-6)


def test_a_collapse_mid_frame_is_an_upper_bound_and_the_next_frame_measures_the_new_link():
    est = BandwidthEstimator(window=10, max_window_s=5.3)
    _, t = _stream(est, [6.05e6] * 10)
    # 8x drop when half of a 32-bit frame has crossed: its rate (1.34e6) is 1.8x the new link's
    stats, t = _straddler(est, t, 6.05e6, 6.05e6 / 8, 0.5)
    assert stats is not None and stats.closed_early and stats.upper_bound
    assert stats.bandwidth == pytest.approx(FRAME / (0.5 * FRAME / 6.05e6 + 0.5 * FRAME / (6.05e6 / 8)))
    # The next frame was carried on the new link alone: it closes a window at once, as a measurement,
    # although it is not half as fast as the bound (before: it waited for 10 acks, 4 s at 8 bits).
    closed, _ = _stream(est, [6.05e6 / 8], t)
    assert len(closed) == 1 and closed[0].closed_early and not closed[0].upper_bound
    assert closed[0].bandwidth == pytest.approx(6.05e6 / 8)


def _straddler_with_tcp(est: BandwidthEstimator, t: float, old: float, new: float, fraction_old: float,
                        every: float = 0.05, acked: int = 1) -> tuple:
    """:func:`_straddler`, with the connection's acknowledged-byte counter read every ``every`` s while
    the frame crosses (backlogged), then once idle before its ack, as ``LinkSender`` reads it."""
    est.on_send(t)
    step = t + fraction_old * FRAME / old
    end = step + (1 - fraction_old) * FRAME / new
    r = t + every
    while r < end:
        carried = (min(r, step) - t) * old + max(0.0, r - step) * new
        est.on_tcp(r, acked + int(carried), True)
        r += every
    est.on_tcp(end, acked + FRAME, False)
    return est.on_ack(end, FRAME, 8, 32, FRAME), end


@pytest.mark.parametrize("fraction_old", [0.1, 0.5, 0.8])
def test_a_collapse_measured_inside_the_frame_is_a_measurement_not_a_bound(fraction_old):
    # The 20x drop at three points of a 32-bit frame: the kernel's acked bytes after the trigger crossed
    # the new link alone, so the window closes on the new rate (within the readings' granularity).
    est = BandwidthEstimator(window=10, max_window_s=5.3)
    _, t = _stream(est, [6.05e6] * 10)
    stats, _ = _straddler_with_tcp(est, t, 6.05e6, 6.05e6 / 20, fraction_old)
    assert stats is not None and stats.closed_early and stats.from_tcp and not stats.upper_bound
    assert stats.bandwidth == pytest.approx(6.05e6 / 20, rel=0.02)
    assert stats.images == 8 and stats.fp32_bytes == FRAME  # the demand is the frame's
    assert est.estimate == stats.bandwidth and est.tcp_windows == 1
    assert PaperPolicy([32, 16, 8, 6, 4, 2], 30.0).update(stats) == 2  # 2.42 Mbit/s carries 30 img/s at 2 bits only


def test_the_measurement_is_the_links_rate_once_tcp_has_recovered_from_the_step():
    # 8x drop mid-frame; for 0.5 s after it the connection delivers at half the new rate (TCP recovering
    # the packets the shaper dropped as its queue shrank, seen in a netns run), then at the new rate.
    est = BandwidthEstimator(window=10, max_window_s=5.3)
    _, t = _stream(est, [6.05e6] * 10)
    old, new = 6.05e6, 6.05e6 / 8
    est.on_send(t)
    step = t + 0.3 * FRAME / old
    rates = [(t, old), (step, new / 2), (step + 0.5, new)]
    end = _finish(t, FRAME, rates)
    r = t + 0.05
    while r < end:
        est.on_tcp(r, 1 + int(_carried(t, r, rates)), True)
        r += 0.05
    est.on_tcp(end, 1 + FRAME, False)
    stats = est.on_ack(end, FRAME, 8, 32, FRAME)
    assert stats is not None and stats.from_tcp
    assert stats.bandwidth == pytest.approx(new, rel=0.03)  # not the 0.5-0.75x of the whole span
    assert PaperPolicy([32, 16, 8, 6, 4, 2], 30.0).update(stats) == 4


@pytest.mark.parametrize("collapse_at", [0.5, 0.9, 1.4, 1.9])
def test_a_dip_that_ended_is_no_trigger_for_a_later_collapse(collapse_at):
    # Two frames always in flight (the connection never idles); a 0.12 s stall, then the old rate again,
    # then a 20x drop later in the same window. Before the review's fix the stall's trigger stayed armed
    # and the collapse was "measured" from readings before it: 1.5-6 MB/s on a 0.3 MB/s link.
    old, new = 6.05e6, 6.05e6 / 20
    est = BandwidthEstimator(window=10, max_window_s=5.3)
    _, t = _stream(est, [old] * 10)
    start, stall = t, (t + 0.3, t + 0.42)
    rates = [(t, old), (stall[0], 1e-9), (stall[1], old), (t + collapse_at, new)]
    est.on_send(t)
    est.on_send(t)
    acked, read, dt, windows = 0, t + 0.05, 1e-3, []
    while acked < 30 and not any(w.closed_early for w in windows):
        t += dt
        if t >= read:
            est.on_tcp(t, 1 + int(_carried(start, t, rates)), True)
            read += 0.05
        if _carried(start, t, rates) >= (acked + 1) * FRAME:
            acked += 1
            stats = est.on_ack(t, FRAME, 8, 32, FRAME)
            if stats is not None:
                windows.append(stats)
            est.on_send(t)
    collapse = [w for w in windows if w.closed_early][0]
    assert collapse.bandwidth == pytest.approx(new, rel=0.05), collapse
    assert collapse.from_tcp or collapse.upper_bound


@pytest.mark.parametrize("every", [0.3, 0.2])
def test_too_few_readings_after_the_trigger_leave_the_upper_bound(every):
    # The step comes when 90 % of the frame has crossed (0.4 s on the new link). Read every 0.3 s the
    # counter never gives a trigger; every 0.2 s it does, but on the last reading before the frame
    # ends: either way the frame's rate stays an upper bound, as without readings.
    est = BandwidthEstimator(window=10, max_window_s=5.3)
    _, t = _stream(est, [6.05e6] * 10)
    stats, _ = _straddler_with_tcp(est, t, 6.05e6, 6.05e6 / 20, 0.9, every=every)
    assert stats is not None and stats.upper_bound and not stats.from_tcp


def test_idle_or_restarted_connections_do_not_trigger():
    est = BandwidthEstimator(window=10)
    _, t = _stream(est, [6.05e6] * 10)
    est.on_send(t)
    # readings while the connection has nothing to deliver (a paced sender between frames) are ignored,
    # and a counter that went backwards (a new connection) starts a new run
    for i in range(10):
        est.on_tcp(t + 0.05 * i, 5_000_000, False)
    est.on_tcp(t + 0.6, 9_000_000, True)
    est.on_tcp(t + 0.65, 10, True)
    est.on_tcp(t + 0.7, 20, True)
    assert est._tcp_after == []
    assert est.on_ack(t + 0.2, FRAME, 8, 32, FRAME) is None  # an ordinary frame: nothing closes


def test_noise_on_a_steady_link_does_not_close_windows_early():
    est = BandwidthEstimator(window=10)
    # short frames, +-40 % jitter and one frame delayed 3x (too short to count on its own)
    rates = [6e6 * (1 + 0.4 * ((i * 7) % 3 - 1)) for i in range(40)]
    rates[15] = 2e6
    closed, _ = _stream(est, rates, nbytes=60_000, bits=2)
    assert [w.closed_early for w in closed] == [False] * 4


# --- one stalled frame (issue 12: the CI flake of the rise) ----------------------------------------------
SMALL = FRAME // 8 + 72  # a 4-bit microbatch of 8 [197, 192] images
LINK = 48.4e6 / 8 * 0.956  # 48.4 Mbit/s tbf, TCP/IP headers off


def _paced(est: BandwidthEstimator, t: float, n: int, gap: float, delays: dict[int, float] | None = None,
           nbytes: int = SMALL, bits: int = 4, rate: float = LINK):
    """``n`` isolated frames, one every ``gap`` seconds (or when the last is acked); frame i is delivered
    ``delays[i]`` seconds late. Returns (closed windows, end time)."""
    closed, delays = [], delays or {}
    for i in range(n):
        est.on_send(t)
        ack = t + nbytes / rate + delays.get(i, 0.0)
        stats = est.on_ack(ack, nbytes, 8, bits, FRAME)
        if stats is not None:
            closed.append(stats)
        t = max(ack, t + gap)
    return closed, t


def test_one_retransmission_in_a_paced_window_does_not_keep_the_policy_a_rung_too_narrow():
    # The rise of the 8x/20x test: at 4 bits on 48.4 Mbit/s, ten paced 4-bit frames of 26 ms, one of them
    # 200 ms late (a TCP tail-loss timeout). Charged in full it measures 3.3e6 B/s, ratio 1.38, and the
    # policy takes 16 bits on a link that carries 32 (ratio 0.79); the next window then widens again.
    policy = PaperPolicy([32, 16, 8, 6, 4, 2], 30.0, start_bits=4)
    for stall_factor, bits in [(0.0, 16), (1.5, 32)]:
        est = BandwidthEstimator(window=10, stall_factor=stall_factor)
        closed, _ = _paced(est, 0.0, 10, 8 / 30, delays={6: 0.2})
        assert len(closed) == 1
        policy.current = 4
        assert policy.update(closed[0]) == bits, (stall_factor, closed[0])
    assert closed[0].stall_s == pytest.approx(0.2 - 0.5 * SMALL / LINK, rel=1e-6)  # charged 1.5 frame times
    assert closed[0].bandwidth == pytest.approx(10 * SMALL / (10.5 * SMALL / LINK), rel=1e-6)


def test_no_clamp_when_the_link_itself_is_slower_or_frames_overlap():
    # the whole window 30 % slower: the median moves with it, nothing is a stall
    est = BandwidthEstimator(window=10)
    closed, _ = _paced(est, 0.0, 10, 8 / 30, rate=LINK / 1.3)
    assert closed[0].stall_s == 0 and closed[0].bandwidth == pytest.approx(LINK / 1.3)
    # most frames slow (the link stepped down early in the window, by less than the collapse factor)
    est = BandwidthEstimator(window=10)
    closed, _ = _paced(est, 0.0, 10, 8 / 30, delays={i: 1.0 * SMALL / LINK for i in range(3, 10)})
    assert closed[0].stall_s == 0
    # fewer than three isolated frames of a bitwidth: too few to call one a stall
    est = BandwidthEstimator(window=2)
    closed, _ = _paced(est, 0.0, 2, 8 / 30, delays={1: 0.2})
    assert closed[0].stall_s == 0
    # a saturated link: frames go out back to back while others are outstanding, and only the first of
    # the window went out isolated, so a delay is what the link gave and is charged in full
    est = BandwidthEstimator(window=10)
    t, closed = 0.0, []
    for i in range(10):
        est.on_send(0.001 * i)
    for i in range(10):
        t += SMALL / LINK + (0.2 if i == 6 else 0.0)
        w = est.on_ack(t, SMALL, 8, 4, FRAME)
        closed += [w] if w is not None else []
    assert closed[0].stall_s == 0 and closed[0].busy_s == pytest.approx(t)


def test_a_stall_factor_below_one_is_refused():
    with pytest.raises(ValueError, match="stall_factor"):
        BandwidthEstimator(window=10, stall_factor=0.5)


def test_output_settle_is_when_the_output_keeps_up_again():
    # 30 img/s in microbatches of 8; nothing from 10 s to 12.5 s (the link collapsed); then 30 img/s again
    times = [i * 8 / 30 for i in range(38)] + [12.5 + i * 8 / 30 for i in range(30)]
    times = [t for t in times for _ in range(8)]
    s = output_settle(times, 10.0, 20.0, 30.0, slack_images=8)
    assert s is not None and 2.2 <= s <= 2.6, s
    assert output_settle(times, 0.0, 10.0, 30.0, slack_images=8) == 0.0
    assert output_settle([t for t in times if t < 12], 10.0, 20.0, 30.0, slack_images=8) is None  # never back


# --- a paced stage on the issue's link, simulated --------------------------------------------------------
FP32_MB = 8 * 197 * 192 * 4  # fp32 bytes of one microbatch of 8 DeiT-Tiny boundary images


def _finish(start: float, nbytes: int, steps: list[tuple[float, float]]) -> float:
    """When ``nbytes`` that start crossing at ``start`` are across a link of ``steps`` [(t, bytes/s)]."""
    t, left = start, float(nbytes)
    i = max(j for j, (ts, _) in enumerate(steps) if ts <= t)
    while True:
        nxt = steps[i + 1][0] if i + 1 < len(steps) else float("inf")
        if t + left / steps[i][1] <= nxt:
            return t + left / steps[i][1]
        left -= (nxt - t) * steps[i][1]
        t, i = nxt, i + 1


def _carried(start: float, end: float, steps: list[tuple[float, float]]) -> float:
    """Bytes a busy link of ``steps`` [(t, bytes/s)] carries from ``start`` to ``end``."""
    total = 0.0
    for i, (ts, r) in enumerate(steps):
        te = steps[i + 1][0] if i + 1 < len(steps) else float("inf")
        lo, hi = max(start, ts), min(end, te)
        if hi > lo:
            total += (hi - lo) * r
    return total


def _paced_stage(mbit: list[tuple[float, float]], duration: float, offset: float, rate: float = 30.0,
                 window: int = 10, tcp_every: float | None = None) -> tuple[list, list]:
    """Microbatches of 8 arrive every 8/R s from ``offset``; one frame in flight (what the credit window's
    byte bound allows for these frames), encoded at the policy's bitwidth when it goes out; the ack
    comes 0.5 ms after the last byte. With ``tcp_every`` the sender also reads the connection's
    acknowledged-byte counter every that many seconds while a frame crosses (and once, idle, before the
    ack), as ``LinkSender`` does on Linux. Returns (decisions [(t, bits)], result times)."""
    est = BandwidthEstimator(window, max_window_s=2 * window * 8 / rate)
    policy = PaperPolicy([32, 16, 8, 6, 4, 2], rate)
    link = [(t, r * 1e6 / 8 * 0.956) for t, r in mbit]  # TCP/IP headers: ~4.4 % of a tbf link
    free, decisions, results, acked = 0.0, [], [], 1
    for k in range(int(duration * rate / 8)):
        sent, bits = max(offset + k * 8 / rate, free), policy.current
        nbytes = FP32_MB * bits // 32 + 72
        est.on_send(sent)
        arrived = _finish(sent, nbytes, link)
        if tcp_every:
            t = sent + tcp_every
            while t < arrived:
                est.on_tcp(t, acked + int(_carried(sent, t, link)), True)
                t += tcp_every
            acked += nbytes
        free = arrived + 0.0005
        if tcp_every:
            est.on_tcp(free, acked, False)
        results += [arrived] * 8
        stats = est.on_ack(free, nbytes, 8, bits, FP32_MB)
        if stats is not None:
            decisions.append((free, policy.update(stats)))
    return decisions, results


@pytest.mark.parametrize("phase", [i / 16 for i in range(16)])
def test_each_step_of_the_issues_link_is_followed_by_one_change(phase):
    """Issue 12.5's link and stage (R = 30 img/s, microbatch 8, window 10 = 2.67 s), the steps at 16
    phases against the frames. Before: two changes (32 -> 6|8|16 -> 4, the first taken on the frame that
    straddled the step) after the 8x drop at 8 of these phases, 4 -> 16 -> 32 after the rise at 4, and
    32 -> 4|8 -> 2 after the 20x drop at 5. Now every step is one change, straight to the final rung.
    The cost: where the straddler's bound does not already call for 2 bits, one more frame at the old
    bitwidth crosses the new link before the measurement (1.65 s on 6.05 Mbit/s, 4.2 s on 2.42), and the
    20x drop then takes up to 2.16 windows (2 phases of 16 above 2)."""
    mbit = [(0.0, 48.4), (15.0, 6.05), (30.0, 48.4), (45.0, 2.42)]
    decisions, results = _paced_stage(mbit, 57.0, offset=phase * 8 / 30)
    nominal = 10 * 8 / 30
    for (start, _), (end, _), final, max_windows in zip(mbit[1:], mbit[2:] + [(57.0, 0)], [4, 32, 2],
                                                        [2.0, 2.0, 2.25]):
        before = [b for t, b in decisions if t < start][-1]
        phase_bits = [b for t, b in decisions if start <= t < end]
        changes = [(x, y) for x, y in zip([before, *phase_bits], phase_bits) if x != y]
        assert changes == [(before, final)], (start, before, phase_bits)
        settle = output_settle(results, start, min(end, max(results)), 30.0, slack_images=8)
        assert settle is not None and settle <= max_windows * nominal, (start, settle)


@pytest.mark.parametrize("phase", [i / 32 for i in range(32)])
def test_with_the_connections_acks_every_step_settles_within_two_windows_in_one_change(phase):
    """The same stage and link, now reading the TCP connection's acknowledged bytes every 50 ms as
    ``LinkSender`` does on Linux: the frame that straddles a collapse measures the new link inside
    itself, and the policy moves once, straight to the final rung, without another frame at the old
    bitwidth. Without the readings (the test above) the 20x drop takes up to 2.23 windows; with them
    at most 1.54 (the 8x drop 0.6), measured over 64 phases."""
    mbit = [(0.0, 48.4), (15.0, 6.05), (30.0, 48.4), (45.0, 2.42)]
    decisions, results = _paced_stage(mbit, 57.0, offset=phase * 8 / 30, tcp_every=0.05)
    nominal = 10 * 8 / 30
    for (start, _), (end, _), final in zip(mbit[1:], mbit[2:] + [(57.0, 0)], [4, 32, 2]):
        before = [b for t, b in decisions if t < start][-1]
        phase_bits = [b for t, b in decisions if start <= t < end]
        changes = [(x, y) for x, y in zip([before, *phase_bits], phase_bits) if x != y]
        assert changes == [(before, final)], (start, before, phase_bits)
        settle = output_settle(results, start, min(end, max(results)), 30.0, slack_images=8)
        assert settle is not None and settle <= 1.6 * nominal, (start, settle)
