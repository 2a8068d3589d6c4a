"""End-to-end bandwidth of one link, measured from acknowledged bytes (no sockets, no clocks of its own).

The original QuantPipe code timed the ``send`` call, which measures how fast the kernel accepted bytes
into a socket buffer, not how fast they reached the next stage (algorithms.md section 8). Here the
sender reports every frame it puts on the link (:meth:`BandwidthEstimator.on_send`) and every
acknowledgement it gets back (:meth:`BandwidthEstimator.on_ack`); the estimate is

    B = acknowledged bytes / busy time

where *busy time* is the time during which at least one frame was outstanding (sent, not yet acked).
Dividing by busy time rather than wall time matters: a sender paced at the target rate leaves the link
idle between frames, and bytes over wall time would then measure the offered load instead of what the
link can carry, so a policy driven by it would never move to a higher bitwidth. When the link is the
bottleneck the link is always busy and both definitions agree.

A :class:`WindowStats` is closed every N acknowledged microbatches (the policy window) and handed to
the bitwidth policy (:mod:`quantpipe.runtime.policy`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WindowStats", "BandwidthEstimator"]


@dataclass(frozen=True)
class WindowStats:
    """What one policy window measured on a link.

    Attributes:
        microbatches: acknowledged microbatches in the window.
        images: acknowledged images (S in the paper's rule).
        bytes: acknowledged bytes on the wire, headers included (V).
        fp32_bytes: what the same images would have cost at 32 bits (V * 32 / q when q is constant).
        busy_s: seconds with at least one frame outstanding.
        elapsed_s: wall seconds from the window's start to its close.
        bits: the bitwidth most of the window's bytes were sent at.
    """

    microbatches: int
    images: int
    bytes: int
    fp32_bytes: int
    busy_s: float
    elapsed_s: float
    bits: int

    @property
    def bandwidth(self) -> float:
        """Bytes per second the link delivered while it was busy (0 when nothing was measured)."""
        return self.bytes / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def output_rate(self) -> float:
        """Images per second acknowledged over the window's wall time."""
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0


class BandwidthEstimator:
    """Accumulates sends and acks of one link and closes a :class:`WindowStats` every ``window`` acks.

    Times are passed in by the caller (``time.monotonic()`` in the daemon), which keeps this object
    deterministic under test.

    Args:
        window: acknowledged microbatches per policy window (the paper's N).
        max_window_s: also close a window after this many seconds if it holds at least one ack. When a
            link collapses, N acknowledgements of frames sized for the old rate can take many times the
            nominal window; the cap bounds how stale the policy's view gets (None: the paper's rule only).
    """

    def __init__(self, window: int, max_window_s: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 microbatch, got {window}")
        if max_window_s is not None and not max_window_s > 0:
            raise ValueError(f"max_window_s must be > 0, got {max_window_s}")
        self.window = window
        self.max_window_s = max_window_s
        self._outstanding = 0
        self._busy_since: float | None = None
        self._last_estimate = 0.0
        self._reset(None)

    def _reset(self, now: float | None) -> None:
        self._start = now
        self._busy = 0.0
        self._mb = 0
        self._images = 0
        self._bytes = 0
        self._fp32 = 0
        self._bytes_by_bits: dict[int, int] = {}
        if self._busy_since is not None and now is not None:
            self._busy_since = now  # busy time carried over is counted in the new window

    @property
    def outstanding(self) -> int:
        """Frames sent and not yet acknowledged."""
        return self._outstanding

    @property
    def estimate(self) -> float:
        """The last closed window's bandwidth in bytes/s (0 before the first window closes)."""
        return self._last_estimate

    def on_send(self, now: float) -> None:
        """A frame entered the link (first transmission; resends do not open new busy time)."""
        if self._start is None:
            self._start = now
        if self._outstanding == 0:
            self._busy_since = now
        self._outstanding += 1

    def on_ack(self, now: float, nbytes: int, images: int, bits: int, fp32_bytes: int) -> WindowStats | None:
        """A frame of ``nbytes`` carrying ``images`` at ``bits`` was acknowledged.

        Returns the closed window every ``window`` acknowledgements, else None.
        """
        if self._outstanding <= 0:
            raise RuntimeError("ack without an outstanding send: the link layer double-counted")
        self._outstanding -= 1
        if self._outstanding == 0 and self._busy_since is not None:
            self._busy += now - self._busy_since
            self._busy_since = None
        self._mb += 1
        self._images += images
        self._bytes += nbytes
        self._fp32 += fp32_bytes
        self._bytes_by_bits[bits] = self._bytes_by_bits.get(bits, 0) + nbytes
        timed_out = self.max_window_s is not None and self._start is not None and now - self._start >= self.max_window_s
        if self._mb < self.window and not timed_out:
            return None
        busy = self._busy + (now - self._busy_since if self._busy_since is not None else 0.0)
        stats = WindowStats(
            microbatches=self._mb, images=self._images, bytes=self._bytes, fp32_bytes=self._fp32,
            busy_s=busy, elapsed_s=now - (self._start if self._start is not None else now),
            bits=max(self._bytes_by_bits, key=self._bytes_by_bits.__getitem__),
        )
        self._last_estimate = stats.bandwidth
        self._reset(now)
        return stats
