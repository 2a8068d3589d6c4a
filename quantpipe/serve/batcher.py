"""Requests and the bounded queue between the asyncio fronts and the ZeroMQ thread (dynamic batching).

A :class:`Request` holds one client request's images (already in the first hop's dtype), its
deadline and an asyncio future that is resolved exactly once: by its results, by an error, or by its
timeout, whichever comes first (every later answer is dropped). The fronts put requests in the
:class:`RequestQueue`; the ZeroMQ thread takes microbatches out of it (:meth:`RequestQueue.take`)
when the first link has a credit, like Triton's dynamic batcher: up to ``microbatch`` images, or fewer
once the oldest queued image has waited ``max_queue_delay_s`` or at once when the pipeline holds
nothing of ours (a wait would then only add latency). A request larger than a microbatch is
split over several; a microbatch may hold images of several requests.

The queue is bounded in images: :meth:`RequestQueue.put` refuses at once (:class:`InferError` 503)
when a request does not fit, so an overloaded pipeline answers "unavailable" instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from quantpipe.serve.protocol import InferError

__all__ = ["Request", "Segment", "RequestQueue"]


class Request:
    """One client request in flight: images in, results (or one error) out, exactly once.

    Only the event loop's thread touches the future and the result buffer; the ZeroMQ thread reads
    :attr:`images` and :attr:`taken` under the queue's lock.
    """

    def __init__(self, images: np.ndarray, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.images = images
        self.n = len(images)
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s
        self.taken = 0  # images handed to microbatches (guarded by the queue's lock)
        self.first_sent: float | None = None  # when its first image left (queue time)
        self._result: np.ndarray | None = None
        self._filled = 0

    @property
    def done(self) -> bool:
        return self.future.done()

    # -- event loop thread only -------------------------------------------------------------------
    def deliver(self, offset: int, y: np.ndarray) -> None:
        """Results for images ``offset .. offset + len(y) - 1``; resolves the future when all are in."""
        if self.future.done():
            return  # answered already (timed out, failed, or the client went away)
        if self._result is None:
            self._result = np.empty((self.n, *y.shape[1:]), dtype=y.dtype)
        self._result[offset:offset + len(y)] = y
        self._filled += len(y)
        if self._filled >= self.n:
            self.future.set_result(self._result)

    def fail(self, exc: InferError) -> bool:
        """Answer with an error unless already answered. Returns whether this call answered it."""
        if self.future.done():
            return False
        self.future.set_exception(exc)
        return True


@dataclass
class Segment:
    """A run of one request's images inside a microbatch."""

    request: Request
    start: int  # first image within the request
    count: int
    offset: int  # position within the microbatch


@dataclass
class _Queued:
    request: Request
    enqueued: float = field(default_factory=time.monotonic)


class RequestQueue:
    """Thread-safe FIFO of requests, bounded in images, that the ZeroMQ thread cuts into microbatches.

    Args:
        capacity_images: most images waiting (not yet sent); more is refused with 503.
        microbatch: images per microbatch (``pipeline.microbatch``).
        max_queue_delay_s: how long the oldest image may wait for a fuller microbatch.
        wake: called (from any thread) after a put, to wake the ZeroMQ thread.
    """

    def __init__(self, capacity_images: int, microbatch: int, max_queue_delay_s: float,
                 wake=lambda: None) -> None:
        if capacity_images < 1 or microbatch < 1 or max_queue_delay_s < 0:
            raise ValueError("capacity >= 1, microbatch >= 1 and max_queue_delay_s >= 0 are required")
        self.capacity = capacity_images
        self.microbatch = microbatch
        self.max_delay = max_queue_delay_s
        self._wake = wake
        self._lock = threading.Lock()
        self._items: deque[_Queued] = deque()
        self._waiting = 0  # images queued and not yet taken
        self.closed = False

    @property
    def waiting(self) -> int:
        return self._waiting

    def put(self, request: Request) -> None:
        """Queue a request, or refuse it at once when it does not fit (503) or the server is stopping."""
        with self._lock:
            if self.closed:
                raise InferError("the server is shutting down", 503, "shutting_down")
            if request.n > self.capacity:
                raise InferError(f"a request of {request.n} images exceeds the queue's capacity of {self.capacity} "
                                 "images: send fewer per request", 400, "too_large")
            if self._waiting + request.n > self.capacity:
                raise InferError(f"the queue is full ({self._waiting} of {self.capacity} images waiting): retry later",
                                 503, "queue_full")
            self._items.append(_Queued(request))
            self._waiting += request.n
        self._wake()

    def withdraw(self, request: Request) -> None:
        """Drop what is still queued of a request that was answered (timeout, error, client gone)."""
        with self._lock:
            left = request.n - request.taken
            if left > 0:
                self._waiting -= left
                request.taken = request.n  # take() skips it from now on

    def due_in(self, now: float, idle: bool = False) -> float | None:
        """Seconds until a microbatch is due (0: now), or None when nothing is queued.

        ``idle``: the pipeline holds nothing of ours; waiting for a fuller microbatch would then only
        add latency (nothing is in flight that the wait could overlap with), so it is due at once."""
        with self._lock:
            self._drop_answered()
            if not self._items:
                return None
            if self._waiting >= self.microbatch or idle:
                return 0.0
            return max(0.0, self._items[0].enqueued + self.max_delay - now)

    def take(self, now: float, force: bool = False) -> tuple[list[Segment], np.ndarray] | None:
        """The next microbatch if one is due (``force``: whatever is queued, e.g. the pipeline is idle),
        as segments and images."""
        with self._lock:
            self._drop_answered()
            if not self._items:
                return None
            if not force and self._waiting < self.microbatch and now < self._items[0].enqueued + self.max_delay:
                return None
            segments, parts, size = [], [], 0
            while self._items and size < self.microbatch:
                q = self._items[0]
                r = q.request
                count = min(r.n - r.taken, self.microbatch - size)
                if count > 0:
                    segments.append(Segment(r, r.taken, count, size))
                    parts.append(r.images[r.taken:r.taken + count])
                    r.taken += count
                    size += count
                    self._waiting -= count
                    if r.first_sent is None:
                        r.first_sent = now
                if r.taken >= r.n:
                    self._items.popleft()
            self._drop_answered()
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return segments, np.ascontiguousarray(images)

    def _drop_answered(self) -> None:
        while self._items and self._items[0].request.taken >= self._items[0].request.n:
            self._items.popleft()

    def close(self) -> list[Request]:
        """Refuse new requests; return those that still had images queued (to be failed)."""
        with self._lock:
            self.closed = True
            left = [q.request for q in self._items if q.request.taken < q.request.n]
            self._items.clear()
            self._waiting = 0
        return left
