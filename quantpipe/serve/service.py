"""The inference service both fronts call: request in, results or one error out, within the timeout.

:meth:`InferenceService.infer` converts the request's input to the first hop's form (off the event
loop when it decodes images), queues it (refused at once with 503 when the queue is full), and waits
for its future, which the ZeroMQ thread's results resolve (:mod:`quantpipe.serve.bridge`). A timer
fails it with 504 at its deadline; whatever arrives later for it is dropped, so every request gets
exactly one answer, also when a stage dies or restarts (the links resend what it held; if that takes
longer than the timeout, the client hears so in time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zmq

from quantpipe.runtime.config import PipelineConfig
from quantpipe.serve.batcher import Request, RequestQueue, Segment
from quantpipe.serve.bridge import Bridge
from quantpipe.serve.model import ServedModel
from quantpipe.serve.observe import ServeMetrics
from quantpipe.serve.protocol import InferError, InferRequest

__all__ = ["ServeOptions", "InferenceService", "first_hop_images"]

log = logging.getLogger(__name__)


class ServeOptions:
    """Serving settings (units in the names)."""

    def __init__(self, *, timeout_s: float = 30.0, max_queue_images: int = 0, max_queue_delay_us: int = 2000,
                 decode_workers: int = 2, stall_s: float = 10.0) -> None:
        if timeout_s <= 0 or max_queue_images < 0 or max_queue_delay_us < 0 or decode_workers < 1 or stall_s <= 0:
            raise ValueError("timeout > 0, queue size >= 0, delay >= 0, workers >= 1 and stall timeout > 0 are required")
        self.timeout_s = timeout_s
        self.max_queue_images = max_queue_images
        self.max_queue_delay_us = max_queue_delay_us
        self.decode_workers = decode_workers
        self.stall_s = stall_s


async def first_hop_images(model: ServedModel, request: InferRequest, loop: asyncio.AbstractEventLoop,
                           decoder: ThreadPoolExecutor) -> np.ndarray:
    """The request's input as the first hop takes it (images decoded and resized in ``decoder``, off the
    event loop), after checking that its outputs can be given; raises :class:`InferError`."""
    t = request.inputs[0] if len(request.inputs) == 1 else None
    if t is not None and model.needs_decoding(t):
        images = await loop.run_in_executor(decoder, model.to_stage_input, request.inputs)
    else:
        images = model.to_stage_input(request.inputs)
    model.check_outputs(request.outputs)
    return images


class InferenceService:
    """The pipeline behind the fronts. Create and :meth:`start` it on the event loop that serves.

    Args:
        cfg: the pipeline config.
        model: the served model (shapes, conversions, metadata).
        options: timeouts, queue bound, batching delay.
        ctx: ZeroMQ context (CURVE when ``keys_dir`` is set).
    """

    def __init__(self, cfg: PipelineConfig, model: ServedModel, options: ServeOptions, ctx: zmq.Context) -> None:
        self.cfg, self.model, self.options = cfg, model, options
        self.metrics = ServeMetrics()
        capacity = options.max_queue_images or 64 * cfg.microbatch
        self.queue = RequestQueue(capacity, cfg.microbatch, options.max_queue_delay_us / 1e6)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.bridge = Bridge(cfg, self.queue, self._deliver, self._post, ctx, observe_batch=self.metrics.observe_batch,
                             stall_s=options.stall_s, observe_round_trip=self.metrics.round_trip.observe)
        self.queue._wake = self.bridge.wake
        self._decoder = ThreadPoolExecutor(options.decode_workers, thread_name_prefix="quantpipe-serve-decode")
        self._in_flight = 0

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.bridge.start()

    def stop(self) -> None:
        for r in self.queue.close():
            if self.loop is not None:
                self.loop.call_soon_threadsafe(r.fail, InferError("the server is shutting down", 503, "shutting_down"))
        self.bridge.stop()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> bool:
        return self.bridge.ready()

    # -- the event loop ---------------------------------------------------------------------------
    def _post(self, fn, *args) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, parts: list[tuple[Segment, object]]) -> None:
        for seg, result in parts:
            r = seg.request
            if isinstance(result, InferError):
                if r.fail(result):
                    self.queue.withdraw(r)
            else:
                r.deliver(seg.start, result)

    async def infer(self, request: InferRequest) -> list[tuple[str, str, np.ndarray, bool]]:
        """Run one request through the pipeline: its outputs, or an :class:`InferError`."""
        assert self.loop is not None, "start() the service on its event loop first"
        images = await first_hop_images(self.model, request, self.loop, self._decoder)
        y = await self.submit(images)
        return self.model.outputs(y, request.outputs, request.binary_default)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Images already in the first hop's form ``[N, *input_shape]`` through the pipeline: the last
        stage's outputs ``[N, *output_shape]``, or an :class:`InferError` (queue full, timeout, a stage's
        error)."""
        r = self.submit_nowait(images)
        try:
            return await r.future
        except asyncio.CancelledError:  # the client went away: free its place in the queue
            self.cancel(r)
            raise

    def submit_nowait(self, images: np.ndarray) -> Request:
        """:meth:`submit` without a task: the queued :class:`Request`, whose future resolves to the outputs
        or an :class:`InferError` (raised at once when the queue is full). The hub of the front worker
        processes (:mod:`quantpipe.serve.workers`) uses it."""
        assert self.loop is not None, "start() the service on its event loop first"
        r = Request(images, self.loop, self.options.timeout_s)
        self.queue.put(r)  # raises 503 at once when full
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        self.metrics.queued.set(self.queue.waiting)
        timer = self.loop.call_at(self.loop.time() + self.options.timeout_s, self._expire, r)

        def finished(_: asyncio.Future) -> None:
            timer.cancel()
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
            self.metrics.queued.set(self.queue.waiting)

        r.future.add_done_callback(finished)
        return r

    def cancel(self, r: Request) -> None:
        """The client of ``r`` went away: answer it (nobody listens) and free its place in the queue."""
        r.fail(InferError("client disconnected", 499, "cancelled"))
        self.queue.withdraw(r)

    def _expire(self, r: Request) -> None:
        waited = time.monotonic() - r.created
        where = "in the queue" if r.first_sent is None else "in the pipeline (a stage is slow, down or restarting)"
        if r.fail(InferError(f"no result within the timeout of {self.options.timeout_s:g} s "
                             f"(waited {waited:.1f} s {where})", 504, "timeout")):
            self.queue.withdraw(r)
