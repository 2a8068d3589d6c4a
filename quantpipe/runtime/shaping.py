"""Link-rate schedules and an in-process token bucket that emulates a shaped link.

A :class:`RateSchedule` is the paper's experiment in data: ``"0:500,20:50,40:250"`` means 500 Mbit/s
from t = 0 s, 50 Mbit/s from t = 20 s, 250 Mbit/s from t = 40 s (times relative to the pipeline's start).
It drives either real shaping (``tools/netlinks.sh`` changing a tc tbf qdisc in a network namespace)
or, where namespaces cannot be made (no root), the emulated link below.

:class:`TokenBucket` is that emulation: the sender may put a frame on the link only when the bucket
holds tokens (bytes), refilled at the link rate; a frame larger than the burst is let through when the
bucket is full and drives it negative, so the long-run rate is exactly the configured one. It models
serialization delay only (no loss, no propagation delay) and is a test/demo device, not a substitute
for measuring a real network: figures in BENCHMARKS.md say which one they used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantpipe.errors import ConfigError

__all__ = ["RateSchedule", "TokenBucket", "MBIT"]

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class RateSchedule:
    """Piecewise-constant link rate: ``steps`` of (start second, Mbit/s), sorted, first at 0."""

    steps: tuple[tuple[float, float], ...]

    @classmethod
    def parse(cls, text: str) -> RateSchedule:
        """Parse ``"T:RATE,T:RATE,..."`` (seconds : Mbit/s); a single ``"RATE"`` is a constant link."""
        steps = []
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            t, _, rate = part.rpartition(":")
            try:
                step = (float(t) if t else 0.0, float(rate))
            except ValueError:
                raise ConfigError(f"bad bandwidth schedule entry '{part}': write SECONDS:MBITS, "
                                  "e.g. --bandwidth-schedule 0:500,20:50,40:250") from None
            if not (math.isfinite(step[0]) and step[0] >= 0 and math.isfinite(step[1]) and step[1] > 0):
                raise ConfigError(f"bad bandwidth schedule entry '{part}': times >= 0, rates > 0 Mbit/s")
            steps.append(step)
        if not steps:
            raise ConfigError("empty bandwidth schedule: give e.g. 0:500,20:50,40:250 (seconds:Mbit/s)")
        steps.sort()
        if steps[0][0] != 0:
            raise ConfigError("a bandwidth schedule must start at 0 s (e.g. 0:500,...)")
        if len({t for t, _ in steps}) != len(steps):
            raise ConfigError("a bandwidth schedule names the same time twice")
        return cls(tuple(steps))

    def rate_at(self, t: float) -> float:
        """Mbit/s in force at ``t`` seconds after the start."""
        rate = self.steps[0][1]
        for start, r in self.steps:
            if t >= start:
                rate = r
        return rate

    @property
    def duration(self) -> float:
        """Start of the last step (the schedule holds its last rate forever after)."""
        return self.steps[-1][0]

    def __str__(self) -> str:
        return ",".join(f"{t:g}:{r:g}" for t, r in self.steps)


class TokenBucket:
    """Bytes may leave at ``rate`` bytes/s on average, with bursts of at most ``burst`` bytes.

    Args:
        rate: bytes per second.
        burst: bucket size in bytes (tokens accumulate up to this while the link is idle).
        now: the current monotonic time.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst > 0:
            raise ConfigError(f"a shaped link needs rate > 0 and burst > 0 (got {rate}, {burst})")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._t = now

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate from ``now`` on (tokens earned so far are kept)."""
        self._refill(now)
        self.rate = float(rate)

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now

    def take(self, nbytes: int, now: float) -> bool:
        """Spend tokens for a frame of ``nbytes`` if the link is free now; False means wait."""
        self._refill(now)
        if self._tokens < min(nbytes, self.burst):
            return False
        self._tokens -= nbytes
        return True

    def refund(self, nbytes: int) -> None:
        """Give back tokens of a frame that could not be sent after all."""
        self._tokens = min(self.burst, self._tokens + nbytes)

    def wait_time(self, nbytes: int, now: float) -> float:
        """Seconds until a frame of ``nbytes`` could be taken."""
        self._refill(now)
        return max(0.0, (min(nbytes, self.burst) - self._tokens) / self.rate)
