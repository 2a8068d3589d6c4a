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

**A step of the link closes the window early.** A window of N acks blends the rate before and after a
step, and when the link collapses N acks of frames sized for the old rate take many nominal windows:
the policy would react late and on a blended figure (issue 12.5). So every ack also gives a per-frame
*delivery rate*: the frame's bytes over the time since the link started carrying it (the previous ack,
or its send when the link was idle). A step is *seen* at the ack of the first frame whose rate departs
from the last window's estimate; that frame may have begun crossing the link before the step, so its
rate blends the two links, while every frame acknowledged after it was carried entirely on the new one.
Hence, when

* the link collapsed: the last frame, or the last two frames together, were delivered at less than
  ``collapse_factor`` of the last window's estimate, and the link carried them for at least
  ``min_frame_s`` (long enough that scheduling noise cannot halve their rate: on a fast link, frames of
  a few milliseconds each are left to the normal window),

the window closes at once on those frames as an **upper bound** of the new rate
(:attr:`WindowStats.upper_bound`: the policy acts on it only where a lower rate could not change its
choice), and the next window closes as soon as frames carried after the collapse add up to
``min_frame_s``: a measurement of the new link alone, about one frame time later. The byte bound of the
credit window (:meth:`quantpipe.runtime.link.LinkSender.has_credit`) follows the bound at once.
When the link got faster (each of the last two frames delivered at more than ``1 / collapse_factor``
times the estimate) nothing is urgent, the output keeps up already, and a few small frames
under-measure a fast TCP link, so the window is not closed but *restarted* from the later of the two
frames (the earlier one may have straddled the step): it closes after N acks measured on the new link
alone, and the policy widens in one step instead of through a blended intermediate rung.

**Inside the frame: the connection's own acknowledgements.** Where the link is a TCP connection on
Linux, the sender also feeds the estimator readings of the kernel's acknowledged-byte counter
(:meth:`BandwidthEstimator.on_tcp`, from :class:`~quantpipe.runtime.tcpinfo.TcpProgress`) while frames
are outstanding. Once the counter's rate over the last ``min_frame_s`` falls below ``collapse_factor``
of the estimate (the *trigger*; it is dropped again as soon as that rate is back above it, so that a
dip that ended is no trigger for a later collapse), every byte acknowledged after that moment crossed the new link: the
readings from the trigger on measure the new link alone, inside the straddling frame. When the
application ack of that frame then shows the collapse, the window closes on the fastest stretch of
those readings (at least a third of their span: TCP may deliver below the new rate for a while as it
recovers what the step dropped, never above it) as a measurement (:attr:`WindowStats.from_tcp`, not
an upper bound), as long as the readings span at least ``min_frame_s`` and that stretch is itself below
``collapse_factor`` of the estimate, so the
policy moves once, straight to the rung the new link allows, instead of waiting for another frame at
the old bitwidth to cross it (4.2 s for a 32-bit microbatch of 8 on 2.42 Mbit/s: issue 12.5's 20x
drop). Without readings (no TCP, not Linux, an emulated link) or with a measurement shorter than
``min_frame_s`` (the step came at the very end of the frame) the upper bound above applies.

**One stalled frame does not halve a window.** A paced sender leaves the link idle between frames, so
most frames go out *isolated* (nothing else outstanding) and the time from their send to their ack is
theirs alone: their bytes over that time are a lower bound of the link's rate, and every delay (a TCP
retransmission timeout, a scheduler stall at either end) only lengthens it. When a window closes
normally and holds at least ``MIN_ISOLATED`` isolated frames of one bitwidth, each of them is charged at
most ``stall_factor`` times the median per-byte time of those frames; the excess is reported as
:attr:`WindowStats.stall_s` and left out of the bandwidth. One 200 ms retransmission in a window of ten
30 ms frames would otherwise measure the link 40 % slow and keep the policy a rung too narrow for a
whole window (issue 12: a 4 -> 16 -> 32 rise on a link that carried 32 bits). Frames sent back to back
(a saturated link) are never clamped: their times overlap and are what the link gives, and a link that
got slower for most of a window moves the median itself.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import NamedTuple

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
        closed_early: the window was cut short by a step of the link (see the module docstring).
        upper_bound: ``bandwidth`` is only an upper bound of the link's new rate: a collapse was seen on
            frames that may have begun crossing the link before it. The next window measures it.
        stall_s: busy seconds left out of ``bandwidth`` as stalls of isolated frames (module docstring).
        from_tcp: ``bytes`` and ``busy_s`` are the TCP connection's acknowledged bytes and seconds after a
            collapse was seen inside a frame (module docstring); ``images`` and ``fp32_bytes`` are the
            frames' whose ack closed the window (they give the demand).
    """

    microbatches: int
    images: int
    bytes: int
    fp32_bytes: int
    busy_s: float
    elapsed_s: float
    bits: int
    closed_early: bool = False
    upper_bound: bool = False
    stall_s: float = 0.0
    from_tcp: bool = False

    @property
    def bandwidth(self) -> float:
        """Bytes per second the link delivered while it was busy, stalls excluded (0 when nothing was measured)."""
        busy = self.busy_s - self.stall_s
        return self.bytes / busy if busy > 0 else 0.0

    @property
    def output_rate(self) -> float:
        """Images per second acknowledged over the window's wall time."""
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _Frame(NamedTuple):
    """One acknowledged frame, as the step detection sees it."""

    nbytes: int
    carried: float  # seconds the link carried it (from its send, or the previous ack if later)
    images: int
    fp32_bytes: int
    bits: int


_TCP_READINGS = 1024  # readings kept after a trigger (50 s at 50 ms; the measurement needs a few)
MIN_ISOLATED = 3  # isolated frames of one bitwidth a window needs before any of them is judged stalled


def _stall_excess(isolated: list[tuple[int, float, int]], factor: float) -> float:
    """Seconds by which isolated frames ``(nbytes, carried, bits)`` exceed ``factor`` x the median
    per-byte time of the window's isolated frames of their bitwidth (groups smaller than MIN_ISOLATED
    are left alone: too few to tell a stall from the link)."""
    by_bits: dict[int, list[tuple[int, float]]] = {}
    for nbytes, carried, bits in isolated:
        if nbytes > 0:
            by_bits.setdefault(bits, []).append((nbytes, carried))
    excess = 0.0
    for frames in by_bits.values():
        if len(frames) < MIN_ISOLATED:
            continue
        per_byte = sorted(c / n for n, c in frames)
        mid = len(per_byte) // 2
        median = per_byte[mid] if len(per_byte) % 2 else 0.5 * (per_byte[mid - 1] + per_byte[mid])
        excess += sum(max(0.0, c - factor * median * n) for n, c in frames)
    return excess


class BandwidthEstimator:
    """Accumulates sends and acks of one link and closes a :class:`WindowStats` every ``window`` acks.

    Times are passed in by the caller (``time.monotonic()`` in the daemon), which keeps this object
    deterministic under test.

    Args:
        window: acknowledged microbatches per policy window (the paper's N).
        max_window_s: also close a window after this many seconds if it holds at least one ack. When a
            link collapses, N acknowledgements of frames sized for the old rate can take many times the
            nominal window; the cap bounds how stale the policy's view gets (None: the paper's rule only).
        collapse_factor: close the window early when the frames' delivery rate is below this fraction
            of the last window's estimate, or above its inverse (0: never; see the module docstring).
        min_frame_s: frames are evidence of a collapse only if the link carried them this long.
        stall_factor: an isolated frame is charged at most this many times its window's median per-byte
            time (0: never clamp; see the module docstring).
    """

    def __init__(self, window: int, max_window_s: float | None = None, collapse_factor: float = 0.5,
                 min_frame_s: float = 0.1, stall_factor: float = 1.5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 microbatch, got {window}")
        if max_window_s is not None and not max_window_s > 0:
            raise ValueError(f"max_window_s must be > 0, got {max_window_s}")
        if not 0 <= collapse_factor < 1:
            raise ValueError(f"collapse_factor must be in [0, 1), got {collapse_factor}")
        if stall_factor != 0 and not stall_factor >= 1:
            raise ValueError(f"stall_factor must be 0 (off) or >= 1, got {stall_factor}")
        self.window = window
        self.max_window_s = max_window_s
        self.collapse_factor = collapse_factor
        self.min_frame_s = min_frame_s
        self.stall_factor = stall_factor
        self._outstanding = 0
        self._busy_since: float | None = None
        self._last_estimate = 0.0
        # first sends not yet acked, in order, and whether each went out with nothing else outstanding
        self._sent_at: collections.deque[tuple[float, bool]] = collections.deque()
        self._last_ack: float | None = None
        self._recent: collections.deque[_Frame] = collections.deque(maxlen=2)  # the last two frames
        self.early_closes = 0
        self._restarted = False  # the window was restarted after a faster link (once per window)
        self._confirming = False  # the last window was an upper bound: close this one on the new link's frames
        # TCP readings (on_tcp): the current run of backlogged readings, and the trigger and latest
        # reading of that run once its rate fell below collapse_factor x the estimate
        self._tcp_run: collections.deque[tuple[float, int]] = collections.deque()
        self._tcp_after: list[tuple[float, int]] = []  # the trigger and the readings after it
        self._tcp_connection = 0
        self.tcp_windows = 0
        self._reset(None)

    def _reset(self, now: float | None) -> None:
        self._start = now
        self._busy = 0.0
        self._mb = 0
        self._images = 0
        self._bytes = 0
        self._fp32 = 0
        self._bytes_by_bits: dict[int, int] = {}
        self._isolated: list[tuple[int, float, int]] = []  # (nbytes, send-to-ack seconds, bits)
        if self._busy_since is not None and now is not None:
            self._busy_since = now  # busy time carried over is counted in the new window

    @property
    def outstanding(self) -> int:
        """Frames sent and not yet acknowledged."""
        return self._outstanding

    @property
    def oldest_send(self) -> float | None:
        """When the oldest frame not yet acknowledged went out (None: none outstanding)."""
        return self._sent_at[0][0] if self._sent_at else None

    @property
    def estimate(self) -> float:
        """The last closed window's bandwidth in bytes/s (0 before the first window closes)."""
        return self._last_estimate

    def on_send(self, now: float) -> None:
        """A frame entered the link (first transmission; resends do not open new busy time)."""
        if self._start is None:
            self._start = now
        isolated = self._outstanding == 0
        if isolated:
            self._busy_since = now
        self._outstanding += 1
        self._sent_at.append((now, isolated))

    def on_tcp(self, now: float, acked: int, backlogged: bool, connection: int = 0) -> None:
        """A reading of the link's delivered-byte counter (TCP's acknowledged bytes) at ``now``.

        ``backlogged``: the connection still had bytes to deliver and the link, not the receiver, held
        them, so the counter grew at the link's rate since the previous backlogged reading.
        ``connection`` identifies the connection the counter belongs to (a reconnection starts over).
        See the module docstring for what the readings do.
        """
        run = self._tcp_run
        if connection != self._tcp_connection:  # another connection: its counter is not this one's
            self._tcp_connection = connection
            run.clear()
            self._tcp_after = []
        if not backlogged or self._outstanding == 0:
            run.clear()  # the run ends; a trigger and the readings after it wait for the frame's ack
            return
        if run and acked < run[-1][1]:
            if acked < run[-1][1] // 2:  # a counter that starts over: a new connection
                run.clear()
            else:  # SACKed segments counted at the MSS, then acked at their size: never backwards
                acked = run[-1][1]
        if not run:  # a new run
            self._tcp_after = []
        run.append((now, acked))
        est, f = self._last_estimate, self.collapse_factor
        if est <= 0 or f <= 0:
            self._tcp_after = []
            return
        while len(run) > 2 and now - run[1][0] >= self.min_frame_s:
            run.popleft()  # keep the latest reading at least min_frame_s old as the start
        t0, a0 = run[0]
        if now - t0 < self.min_frame_s:  # too short to judge yet
            if self._tcp_after and len(self._tcp_after) < _TCP_READINGS:
                self._tcp_after.append((now, acked))
            return
        if (acked - a0) / (now - t0) >= f * est:
            self._tcp_after = []  # not (or no longer) slow: a dip that ended is no trigger for later
        elif not self._tcp_after:
            self._tcp_after = [(now, acked)]  # the trigger
        elif len(self._tcp_after) < _TCP_READINGS:
            self._tcp_after.append((now, acked))

    def _tcp_measurement(self) -> tuple[int, float] | None:
        """(bytes, seconds) of the fastest stretch of the readings after the trigger, or None if they
        span less than ``min_frame_s``.

        A stretch is at least a third of the span (and ``min_frame_s``) long. Right after a step the
        connection may deliver below the link's rate while TCP recovers the packets the step dropped (a
        shaper whose queue shrank with its rate, a radio that changed its modulation); a backlogged
        connection never delivers above it, so the fastest stretch is the best measurement of the new
        link that the readings hold."""
        after = self._tcp_after
        if len(after) < 2 or after[-1][0] - after[0][0] < self.min_frame_s or after[-1][1] <= after[0][1]:
            return None
        least = max(self.min_frame_s, (after[-1][0] - after[0][0]) / 3)
        best: tuple[int, float] | None = None
        j = 0
        for i, (ti, ai) in enumerate(after):
            j = max(j, i + 1)
            while j < len(after) and after[j][0] - ti < least:
                j += 1
            if j == len(after):
                break
            tj, aj = after[j]
            if best is None or (aj - ai) * best[1] > best[0] * (tj - ti):
                best = (aj - ai, tj - ti)
        return best

    def on_ack(self, now: float, nbytes: int, images: int, bits: int, fp32_bytes: int) -> WindowStats | None:
        """A frame of ``nbytes`` carrying ``images`` at ``bits`` was acknowledged.

        Returns the closed window every ``window`` acknowledgements, else None.
        """
        if self._outstanding <= 0:
            raise RuntimeError("ack without an outstanding send: the link layer double-counted")
        self._outstanding -= 1
        sent, isolated = self._sent_at.popleft() if self._sent_at else (now, False)
        # Delivery rate of this frame: the link carried it from when it went out or, if the link was
        # still busy with the previous one then, from that one's ack.
        carried = now - max(sent, self._last_ack if self._last_ack is not None else sent)
        self._last_ack = now
        self._recent.append(_Frame(nbytes, max(carried, 0.0), images, fp32_bytes, bits))
        if self._outstanding == 0 and self._busy_since is not None:
            self._busy += now - self._busy_since
            self._busy_since = None
        self._mb += 1
        self._images += images
        self._bytes += nbytes
        self._fp32 += fp32_bytes
        self._bytes_by_bits[bits] = self._bytes_by_bits.get(bits, 0) + nbytes
        if isolated:  # its send-to-ack time, counted from the window's start if it began in the last one
            self._isolated.append((nbytes, now - max(sent, self._start if self._start is not None else sent), bits))
        busy = self._busy + (now - self._busy_since if self._busy_since is not None else 0.0)
        # After an upper bound, every frame acked was carried after the collapse was seen: measure it as
        # soon as the link carried them long enough, without waiting for N of them (nor for another halving).
        confirmed = self._confirming and busy >= self.min_frame_s
        if not self._confirming:
            collapsed = self._step_seen()
            if collapsed is not None:
                return collapsed
        timed_out = self.max_window_s is not None and self._start is not None and now - self._start >= self.max_window_s
        if self._mb < self.window and not timed_out and not confirmed:
            return None
        stats = WindowStats(
            microbatches=self._mb, images=self._images, bytes=self._bytes, fp32_bytes=self._fp32,
            busy_s=busy, elapsed_s=now - (self._start if self._start is not None else now),
            bits=max(self._bytes_by_bits, key=self._bytes_by_bits.__getitem__),
            closed_early=confirmed and self._mb < self.window,
            stall_s=_stall_excess(self._isolated, self.stall_factor) if self.stall_factor else 0.0,
        )
        if stats.closed_early:
            self.early_closes += 1
        self._last_estimate = stats.bandwidth
        self._restarted = False
        self._confirming = False
        self._tcp_after = []
        self._reset(now)
        return stats

    def _step_seen(self) -> WindowStats | None:
        """The upper-bound window closed early from the last frame(s), if their rate says the link
        collapsed; restarts the window if it says the link got faster (see the module docstring)."""
        est, f = self._last_estimate, self.collapse_factor
        if f <= 0 or est <= 0 or not self._recent:
            return None

        def rate(frames: list[_Frame]) -> float:
            carried = sum(r.carried for r in frames)
            return sum(r.nbytes for r in frames) / carried if carried > 0 else float("inf")

        last, both = [self._recent[-1]], list(self._recent)
        long_last = last[0].carried >= self.min_frame_s and rate(last) < f * est
        pair = len(both) == 2
        long_pair = pair and sum(r.carried for r in both) >= self.min_frame_s  # ms-long frames: noise, not evidence
        if long_last or (long_pair and rate(both) < f * est):
            frames = last if rate(last) <= rate(both) else both  # the frames that saw the new rate best
        elif pair and not self._restarted and all(f * rate([r]) > est for r in both):
            # Faster (each frame, so that one that straddled the step does not count): measure anew, from
            # the later frame only. It was carried after the earlier one's ack, so on the new link; the
            # earlier one may have begun on the old link, and a straddler that came out faster than
            # est / f but slower than the new link would bias the new window low (issue 12.5: a 16-bit
            # rung on the way from 4 to 32 bits).
            self._restarted = True
            seed = both[-1]
            self._reset(self._last_ack - seed.carried)
            self._mb, self._images, self._bytes, self._fp32 = 1, seed.images, seed.nbytes, seed.fp32_bytes
            self._bytes_by_bits[seed.bits] = seed.nbytes
            self._busy = seed.carried
            if self._busy_since is not None:
                self._busy_since = self._last_ack
            return None
        else:
            return None
        carried = sum(r.carried for r in frames)
        measured = self._tcp_measurement()
        if measured is not None and measured[0] >= f * est * measured[1]:
            measured = None  # not slow after all (readings from before the collapse): keep the bound
        self._tcp_after = []
        common = {"microbatches": len(frames), "images": sum(r.images for r in frames),
                  "fp32_bytes": sum(r.fp32_bytes for r in frames), "elapsed_s": carried, "bits": frames[-1].bits,
                  "closed_early": True}
        if measured is not None:  # the new link alone, measured inside the frame: no bound, no confirming
            stats = WindowStats(**common, bytes=measured[0], busy_s=measured[1], from_tcp=True)
            self.tcp_windows += 1
        else:
            stats = WindowStats(**common, bytes=sum(r.nbytes for r in frames), busy_s=carried, upper_bound=True)
        self.early_closes += 1
        self._last_estimate = stats.bandwidth
        self._recent.clear()  # the next verdict needs frames measured against the new estimate
        self._restarted = False
        self._confirming = measured is None
        self._reset(self._last_ack)
        return stats
