"""Link-rate schedules and an in-process emulation of a slow link.

A :class:`RateSchedule` is the paper's experiment in data: ``"0:500,20:50,40:250"`` means 500 Mbit/s
from t = 0 s, 50 Mbit/s from t = 20 s, 250 Mbit/s from t = 40 s (times relative to the pipeline's start).
It drives either real shaping (``tools/netlinks.sh`` changing a tc tbf qdisc in a network namespace)
or, where namespaces cannot be made (no root), the emulated link below.

:class:`EmulatedLink` is that emulation: the sender holds each frame for as long as the link would
take to serialize it, one frame after another, so the long-run rate is exactly the configured one and
every frame is delayed as on a real link of that rate. It models serialization delay only (no loss,
no propagation delay, no TCP) and is a test/demo device, not a substitute for measuring a real
network: figures in BENCHMARKS.md say which one they used.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from quantpipe.errors import ConfigError

__all__ = ["RateSchedule", "EmulatedLink", "MBIT"]

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


class EmulatedLink:
    """A store-and-forward link of ``rate`` bytes/s: a frame leaves when its last byte would have.

    Frames are serialized one after another: a frame of ``n`` bytes offered at ``now`` is released at
    ``max(now, end of the previous frame) + n / rate``. Holding the whole frame (rather than letting it
    go and paying the debt later, as a token bucket does) makes the delay that a slow link adds to each
    frame visible to the acknowledgement-based bandwidth measurement, as on a real link.

    Args:
        rate: bytes per second.
        now: the current monotonic time.
    """

    def __init__(self, rate: float, now: float) -> None:
        if not rate > 0:
            raise ConfigError(f"an emulated link needs rate > 0 bytes/s (got {rate})")
        self.rate = float(rate)
        self._free_at = now
        self._crossing: collections.deque[tuple[float, float, int]] = collections.deque()  # (start, end, bytes)
        self._crossed = 0

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate for frames offered from ``now`` on (a frame in serialization keeps its time)."""
        if not rate > 0:
            raise ConfigError(f"an emulated link needs rate > 0 bytes/s (got {rate})")
        self.rate = float(rate)

    def release_time(self, nbytes: int, now: float) -> float:
        """Offer a frame of ``nbytes`` at ``now``; returns when it has fully crossed the link."""
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.rate
        self.progress(now)  # forget what has crossed, also when nobody reads the progress
        self._crossing.append((start, self._free_at, int(nbytes)))
        return self._free_at

    def progress(self, now: float) -> tuple[int, bool]:
        """``(bytes crossed so far, a frame is crossing now)``: what a real link's TCP connection reports
        as its acknowledged bytes (:mod:`quantpipe.runtime.tcpinfo`), for a frame's bytes crossing at
        its rate from its start to its release."""
        while self._crossing and self._crossing[0][1] <= now:
            self._crossed += self._crossing.popleft()[2]
        if not self._crossing or self._crossing[0][0] > now:
            return self._crossed, False
        start, end, nbytes = self._crossing[0]
        return self._crossed + int(nbytes * (now - start) / (end - start)), True
