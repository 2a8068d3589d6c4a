"""Bitwidth policies: choose the next window's bitwidth from what the last window measured.

A policy is a plain object behind :class:`BitwidthPolicy` (``initial()`` and ``update(stats)``), so it
is unit-tested without sockets and another controller (an integral controller, a Kalman-filtered
workload estimate, time-sharing between two rungs) can replace it without touching the daemon.

:class:`PaperPolicy` is QuantPipe's rule (Wang et al. 2022; algorithms.md section 8). Over a window of
N microbatches at bitwidth q that moved V bytes for S images while the link delivered B bytes/s:

    ratio = ceil( V * (32 / q) / ((S / R) * B) )

is how many times too large fp32 data would be to reach the target output rate R. The rule takes the
widest rung whose compression covers the ratio: 32 bits needs ratio <= 1, 16 bits <= 2, 8 <= 4,
6 <= 5, 4 <= 8, else 2 (the original code's ladder, which is ``ratio <= 32 // bits``), restricted to
the bitwidths the clip table holds.

Hysteresis keeps it from oscillating between two rungs when the link sits near a threshold: a
narrower bitwidth is taken as soon as a window says the current one is too wide (falling behind costs
queueing at once), but a wider one only when the ratio computed with ``upgrade_margin`` of extra
demand still allows it. A step of the link rate is followed within one window (two when the window
straddles the step).

A window that is only an upper bound of the link's rate (:attr:`WindowStats.upper_bound`: a collapse
seen on a frame that may have begun on the faster link) gives only a lower bound of the ratio. The
policy moves on it only when that bound already calls for the narrowest rung, which no lower rate
could change; otherwise it keeps the bitwidth until the next window, which measures the new link
alone about one frame later (:class:`~quantpipe.runtime.bandwidth.BandwidthEstimator`), and then
moves once. Moving on the bound would take the widest rung the blend allows and, since the blend
overstates the new rate, a second, narrower one a frame later. Where the link reads its TCP
connection's acknowledged bytes inside the frame (:mod:`quantpipe.runtime.tcpinfo`) the collapse
window is a measurement of the new link instead (:attr:`WindowStats.from_tcp`), and the policy moves on
it at once like on any other window.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from quantpipe.errors import ConfigError
from quantpipe.quant.primitives import WIRE_BITS
from quantpipe.runtime.bandwidth import WindowStats

__all__ = ["BitwidthPolicy", "FixedPolicy", "PaperPolicy", "make_policy"]


@runtime_checkable
class BitwidthPolicy(Protocol):
    """Chooses the bitwidth of the frames a stage sends."""

    def initial(self) -> int:
        """The bitwidth before anything was measured."""

    def update(self, stats: WindowStats) -> int:
        """The bitwidth for the next window, given the window that just closed."""


class FixedPolicy:
    """Always the same bitwidth (fixed-precision runs, exactness checks at 32 bits)."""

    def __init__(self, bits: int) -> None:
        if bits not in WIRE_BITS:
            raise ConfigError(f"fixed bitwidth {bits} is not one of {WIRE_BITS}")
        self.bits = bits

    def initial(self) -> int:
        return self.bits

    def update(self, stats: WindowStats) -> int:
        return self.bits


class PaperPolicy:
    """The paper's ratio rule toward a target output rate, with upgrade hysteresis.

    Args:
        allowed: bitwidths this link may use (32 plus those the clip table holds).
        target_rate: R, images per second the pipeline should deliver.
        upgrade_margin: extra demand (fraction) a wider bitwidth must still fit with before it is taken.
        start_bits: bitwidth of the first window; default the widest allowed (the paper starts at fp32).
    """

    def __init__(self, allowed: list[int] | tuple[int, ...], target_rate: float, *, upgrade_margin: float = 0.15,
                 start_bits: int | None = None) -> None:
        bits = sorted({int(b) for b in allowed}, reverse=True)
        if not bits or any(b not in WIRE_BITS for b in bits):
            raise ConfigError(f"allowed bitwidths {list(allowed)} must be a non-empty subset of {WIRE_BITS}")
        if not target_rate > 0:
            raise ConfigError(f"target_rate must be > 0 images/s, got {target_rate}")
        if not 0 <= upgrade_margin < 1:
            raise ConfigError(f"upgrade_margin must be in [0, 1), got {upgrade_margin}")
        if start_bits is not None and start_bits not in bits:
            raise ConfigError(f"start bitwidth {start_bits} is not among the allowed {bits}")
        self.allowed = bits
        self.target_rate = float(target_rate)
        self.upgrade_margin = upgrade_margin
        self.current = start_bits if start_bits is not None else bits[0]
        self.last_ratio: float | None = None

    def initial(self) -> int:
        return self.current

    def demand_ratio(self, stats: WindowStats) -> float:
        """V * (32/q) / ((S/R) * B) before rounding up: fp32 demand over link capacity."""
        if stats.images <= 0 or stats.bandwidth <= 0:
            return math.nan
        return stats.fp32_bytes / ((stats.images / self.target_rate) * stats.bandwidth)

    def rung(self, ratio: float) -> int:
        """The widest allowed bitwidth whose compression covers ``ceil(ratio)`` (else the narrowest)."""
        need = max(1, math.ceil(ratio - 1e-9))
        for b in self.allowed:
            if need <= 32 // b:
                return b
        return self.allowed[-1]

    def update(self, stats: WindowStats) -> int:
        ratio = self.demand_ratio(stats)
        self.last_ratio = ratio
        if math.isnan(ratio):
            return self.current  # nothing measured (no acks or zero busy time): keep going
        candidate = self.rung(ratio)
        if stats.upper_bound:  # ratio is a lower bound: only the narrowest rung is certain
            narrowest = self.allowed[-1]
            self.current = narrowest if candidate == narrowest else self.current
            return self.current
        if candidate > self.current:
            # Widen only if it would still fit with margin, and then only as far as the margin allows.
            candidate = max(self.current, self.rung(ratio * (1.0 + self.upgrade_margin)))
        self.current = candidate
        return candidate


def make_policy(name: str, *, allowed: list[int], target_rate: float, upgrade_margin: float = 0.15,
                fixed_bits: int | None = None) -> BitwidthPolicy:
    """Build a policy by name: ``"paper"`` (default) or ``"fixed"`` (needs ``fixed_bits``)."""
    if name == "fixed":
        if fixed_bits is None:
            raise ConfigError("policy 'fixed' needs fixed_bits (e.g. --bits 8)")
        return FixedPolicy(fixed_bits)
    if name == "paper":
        return PaperPolicy(allowed, target_rate, upgrade_margin=upgrade_margin)
    raise ConfigError(f"unknown policy '{name}': choose 'paper' or 'fixed'")
