"""The bitwidth policy and the bandwidth estimator, without sockets: the paper's rule, hysteresis,
and a simulated link whose rate steps like the paper's experiment."""

from __future__ import annotations

import math

import pytest

from quantpipe.errors import ConfigError
from quantpipe.runtime.bandwidth import BandwidthEstimator, WindowStats
from quantpipe.runtime.policy import BitwidthPolicy, FixedPolicy, PaperPolicy, make_policy

ALL = [32, 16, 8, 6, 4, 2]
FP32_IMAGE = 197 * 192 * 4  # DeiT-Tiny boundary, bytes per image at 32 bits


def _window(bits: int, bandwidth: float, images: int = 80) -> WindowStats:
    nbytes = images * FP32_IMAGE * bits // 32
    return WindowStats(microbatches=10, images=images, bytes=nbytes, fp32_bytes=images * FP32_IMAGE,
                       busy_s=nbytes / bandwidth, elapsed_s=1.0, bits=bits)


@pytest.mark.parametrize("ratio, bits", [(0.5, 32), (1.0, 32), (1.01, 16), (2.0, 16), (3.5, 8), (4.0, 8),
                                         (4.5, 6), (5.0, 6), (5.5, 4), (8.0, 4), (8.5, 2), (100.0, 2)])
def test_ladder_is_the_papers(ratio, bits):
    # 32: ratio <= 1, 16: <= 2, 8: <= 4, 6: <= 5, 4: <= 8, else 2 (algorithms.md section 8)
    assert PaperPolicy(ALL, 10.0).rung(ratio) == bits


def test_ladder_skips_bitwidths_the_table_lacks():
    p = PaperPolicy([32, 8, 2], 10.0)
    assert p.rung(1.5) == 8 and p.rung(4.5) == 2 and p.rung(0.9) == 32


def test_ratio_is_fp32_demand_over_capacity():
    target = 100.0
    p = PaperPolicy(ALL, target)
    bw = 3.0 * target * FP32_IMAGE  # the link carries exactly 3x... of fp32 at the target: ratio 1/3
    stats = _window(8, bw)
    assert p.demand_ratio(stats) == pytest.approx(target * FP32_IMAGE / bw)
    assert p.update(stats) == 32


def test_downgrade_is_immediate_upgrade_needs_margin():
    target = 100.0
    p = PaperPolicy(ALL, target, upgrade_margin=0.15, start_bits=8)
    fp32_rate = target * FP32_IMAGE
    # ratio 1.9: 16 bits fits, 1.9 * 1.15 = 2.19 does not -> stays at 8 (no upgrade on a marginal link)
    assert p.update(_window(8, fp32_rate / 1.9)) == 8
    # ratio 1.6: 1.6 * 1.15 = 1.84 <= 2 -> upgrade to 16
    assert p.update(_window(8, fp32_rate / 1.6)) == 16
    # ratio 2.5 at 16 bits: falling behind -> down to 8 at once, no margin
    assert p.update(_window(16, fp32_rate / 2.5)) == 8


def test_an_upper_bound_moves_the_policy_only_to_the_narrowest_rung():
    """A collapse seen on a frame that may have begun on the faster link bounds the new rate from above:
    the ratio is at least what it says. Only a bound that already calls for the narrowest rung is acted
    on; otherwise the policy waits for the next window, which measures the new link alone."""
    from dataclasses import replace

    target = 100.0
    fp32_rate = target * FP32_IMAGE
    p = PaperPolicy(ALL, target)
    # ratio >= 3 (the rate is at most fp32/3): 8 bits if it were a measurement, but 4 or 2 may be needed
    assert p.update(replace(_window(32, fp32_rate / 3), upper_bound=True)) == 32
    assert p.update(_window(32, fp32_rate / 6)) == 4  # the measurement that follows: one change
    p = PaperPolicy(ALL, target)
    assert p.update(replace(_window(32, fp32_rate / 9), upper_bound=True)) == 2  # ratio >= 9: only 2 fits
    assert p.update(_window(2, fp32_rate / 15)) == 2
    p = PaperPolicy(ALL, target, start_bits=4)
    assert p.update(replace(_window(4, fp32_rate / 0.5), upper_bound=True)) == 4  # a bound never widens
    assert p.update(replace(_window(32, fp32_rate / 3), upper_bound=False)) == 8  # a measurement moves at once


def test_nothing_measured_keeps_the_bitwidth():
    p = PaperPolicy(ALL, 50.0, start_bits=6)
    empty = WindowStats(microbatches=0, images=0, bytes=0, fp32_bytes=0, busy_s=0.0, elapsed_s=1.0, bits=6)
    assert p.update(empty) == 6 and math.isnan(p.last_ratio)


def test_policies_share_the_interface_and_validate():
    assert isinstance(PaperPolicy(ALL, 1.0), BitwidthPolicy) and isinstance(FixedPolicy(8), BitwidthPolicy)
    assert make_policy("fixed", allowed=ALL, target_rate=1, fixed_bits=4).update(_window(4, 1e6)) == 4
    for bad in (lambda: PaperPolicy([], 1.0), lambda: PaperPolicy([3, 33], 1.0), lambda: PaperPolicy(ALL, 0.0),
                lambda: make_policy("pid", allowed=ALL, target_rate=1), lambda: make_policy("fixed", allowed=ALL, target_rate=1)):
        with pytest.raises(ConfigError):
            bad()


def test_estimator_divides_by_busy_time_not_wall_time():
    est = BandwidthEstimator(window=2)
    # Two 1000-byte frames, each on the link for 0.1 s, with 0.8 s idle between: a paced sender.
    est.on_send(0.0)
    assert est.on_ack(0.1, 1000, 4, 8, 4000) is None
    est.on_send(0.9)
    stats = est.on_ack(1.0, 1000, 4, 8, 4000)
    assert stats is not None
    assert stats.busy_s == pytest.approx(0.2) and stats.bandwidth == pytest.approx(10_000)
    assert stats.elapsed_s == pytest.approx(1.0) and stats.output_rate == pytest.approx(8)
    assert (stats.images, stats.bytes, stats.fp32_bytes, stats.bits) == (8, 2000, 8000, 8)
    assert est.estimate == pytest.approx(10_000)


def test_estimator_counts_overlapping_frames_once():
    est = BandwidthEstimator(window=3)
    for t in (0.0, 0.0, 0.0):
        est.on_send(t)  # a window of three in flight: the link is busy once, not three times
    est.on_ack(0.1, 100, 1, 32, 100)
    est.on_ack(0.2, 100, 1, 32, 100)
    stats = est.on_ack(0.3, 100, 1, 32, 100)
    assert stats.busy_s == pytest.approx(0.3) and stats.bandwidth == pytest.approx(1000)
    with pytest.raises(RuntimeError):
        est.on_ack(0.4, 1, 1, 32, 1)  # more acks than sends is a bug in the caller


def _simulate(schedule: list[tuple[int, float]], target: float, windows_per_phase: int = 8):
    """Feed the policy windows measured on a link that can carry ``rate`` bytes/s (plus 3 % framing
    overhead, as TCP/IP adds); the window at a step straddles it half and half."""
    p = PaperPolicy(ALL, target)
    bits, history = p.initial(), []
    prev_rate = None
    for _, rate in schedule:
        for w in range(windows_per_phase):
            eff = rate / 1.03
            if w == 0 and prev_rate is not None:  # straddling window: harmonic mix of the two rates
                eff = 2 / (1 / eff + 1.03 / prev_rate)
            bits = p.update(_window(bits, eff))
            history.append(bits)
        prev_rate = rate
    return history


def test_paper_experiment_adapts_within_two_windows_without_oscillating():
    target = 100.0
    fp32 = target * FP32_IMAGE  # bytes/s needed at 32 bits
    # Link rates chosen like the scaled experiment: ratio 1.2 (-> 16), 12 (-> 2), 2.4 (-> 8)
    history = _simulate([(0, fp32 / 1.2), (1, fp32 / 12), (2, fp32 / 2.4)], target)
    phases = [history[0:8], history[8:16], history[16:24]]
    for phase, expected in zip(phases, (16, 2, 8)):
        settled = next(i for i, b in enumerate(phase) if all(x == expected for x in phase[i:]))
        assert settled <= 1, (phase, expected)  # settled by the 2nd window after the step
