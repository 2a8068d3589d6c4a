"""Front worker processes: ``quantpipe serve --workers N`` spreads HTTP/gRPC parsing over N processes.

One Python process parses about 1,000 requests of 602 KB per second (BENCHMARKS.md section 7): its
event loop holds the GIL. With ``--workers N`` the fronts run in N processes that all listen on the
same ports (``SO_REUSEPORT``: the kernel spreads connections over them), and the pipeline's ends stay
in the main process, the *hub*, so the links to the stages keep one sender and one receiver::

    client --HTTP/gRPC--> worker k: parse, check, preprocess    (N processes)
                          |  ZeroMQ DEALER -> ROUTER over ipc:// (a private directory), zero-copy frames
                          v
                   hub: InferenceService.submit_nowait -> queue -> Bridge -> stage 0 ... -> results
                          |
    client <-----------  worker k: outputs, classification, response encoding

Messages (multipart; ``rid`` = 8 bytes, the worker's request number):

* worker -> hub: ``hello json`` (its index and pid, once it listens) | ``infer rid header data`` (header:
  JSON dtype and shape of the first-hop images; the client requests that reached the worker in one
  event-loop iteration travel as one, split again by the worker) | ``cancel rid`` (every client of it
  went away) | ``answered json`` (the outcomes of the requests answered in the last 0.1 s, for the
  metrics) | ``metrics``.
* hub -> worker: ``result rid header data`` | ``error rid json`` (the :class:`InferError`'s message,
  status and reason) | ``status json`` (ready, every 0.25 s) | ``metrics text``.

The hub owns the only metrics registry (workers report their requests' outcomes to it, and ``/metrics``
on any worker returns the hub's exposition), the queue bound, the timeouts and exactly-once delivery
(:class:`~quantpipe.serve.service.InferenceService`); a worker that loses its hub (no status for 2 s)
reports not ready and fails requests with 503, and dies with it (parent-death signal). A worker that
dies is started again by the hub; the requests it held are answered by nobody but their connections
close, as with any server process that dies.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio  # the workers' side; the hub uses plain ZeroMQ in its I/O thread

from quantpipe.errors import QuantpipeError
from quantpipe.serve.model import ServedModel
from quantpipe.serve.protocol import InferError, InferRequest
from quantpipe.serve.service import first_hop_images

__all__ = ["WorkerSpec", "Hub", "RemoteService", "reserve_port"]

log = logging.getLogger("quantpipe.serve.workers")

_STATUS_EVERY_S = 0.25
_HUB_LOST_S = 2.0
_RID = struct.Struct("<Q")


@dataclass
class WorkerSpec:
    """Everything a worker needs (pickled to the spawned process): no pipeline config, no stage links."""

    endpoint: str
    model: ServedModel
    http: tuple[str, int] | None
    grpc: tuple[str, int] | None
    token: str | None
    max_body_bytes: int
    access_log_per_s: float
    timeout_s: float
    max_queue_delay_us: int
    queue_capacity: int
    microbatch: int
    decode_workers: int
    log_level: int
    parent: int


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, ``SO_REUSEPORT`` socket holding ``port`` (0: a free one) for the workers.

    Connections only go to listening sockets, so holding it steals none; it keeps the port from being
    taken between workers starting and stops a port-0 choice from changing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        # SO_REUSEPORT would let us share a port another server of this user listens on: refuse that
        # first, as a single-process server does
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


# ------------------------------------------------------------------------------------------------ hub
class Hub:
    """The main process's side: a ROUTER that turns worker messages into
    :meth:`InferenceService.submit_nowait` calls, and the N worker processes it starts, watches and restarts.

    The ROUTER belongs to one I/O thread (plain blocking ZeroMQ): it drains every message that is
    waiting and hands the batch to the event loop in one call, and sends what the loop queues for it
    (an inproc PUSH/PULL pair wakes it). No task or asyncio socket machinery per request: at a few
    thousand requests per second that machinery, not the pipeline, was what held the hub's GIL.
    """

    def __init__(self, service: Any, spec: WorkerSpec, workers: int) -> None:
        self.service, self.spec, self.n = service, spec, workers
        self._dir = tempfile.mkdtemp(prefix="quantpipe-serve-")
        os.chmod(self._dir, 0o700)  # only this user may connect to the hub
        self.endpoint = f"ipc://{self._dir}/hub"
        self.spec.endpoint = self.endpoint
        # one ZeroMQ I/O thread moves about 1-2 GB/s: the hub receives every worker's images
        self.ctx = zmq.Context(io_threads=max(1, min(4, workers // 2)))
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops at its high-water mark: results must not be lost
        self.sock.bind(self.endpoint)
        self._out_addr = f"inproc://quantpipe-hub-out-{id(self)}"
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(self._out_addr)
        self._push = self.ctx.socket(zmq.PUSH)  # used by the event loop's thread only
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never block the event loop
        self._push.connect(self._out_addr)
        self._requests: dict[tuple[bytes, bytes], Any] = {}  # (worker, rid) -> Request in the service
        self._workers: dict[int, bytes] = {}  # worker index -> routing id of its latest hello
        self._procs: list[Any] = []
        self._loops: list[asyncio.Task] = []
        self._hello = asyncio.Event()
        self._closing = False
        self._io: Any = None

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start the workers and wait until each has said hello (its ports are listening)."""
        import threading

        self.loop = asyncio.get_running_loop()
        self._io = threading.Thread(target=self._io_thread, name="quantpipe-serve-hub", daemon=True)
        self._io.start()
        self._loops = [asyncio.create_task(self._status()), asyncio.create_task(self._watch())]
        mp = multiprocessing.get_context("spawn")
        self._procs = [self._spawn(mp, k) for k in range(self.n)]
        deadline = time.monotonic() + timeout_s
        while len(self._workers) < self.n:
            dead = [p for p in self._procs if p.exitcode is not None]
            if dead:
                raise QuantpipeError(f"a front worker exited with {dead[0].exitcode} while starting (see its log above)")
            if time.monotonic() > deadline:
                raise QuantpipeError(f"only {len(self._workers)} of {self.n} front workers started within {timeout_s:g} s")
            self._hello.clear()
            try:
                await asyncio.wait_for(self._hello.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    def _spawn(self, mp: Any, k: int) -> Any:
        p = mp.Process(target=worker_main, args=(self.spec, k), name=f"quantpipe-serve-worker-{k}", daemon=True)
        p.start()
        return p

    async def stop(self) -> None:
        self._closing = True
        for t in self._loops:
            t.cancel()
        for p in self._procs:
            if p.exitcode is None:
                p.terminate()
        for p in self._procs:
            await asyncio.get_running_loop().run_in_executor(None, p.join, 5.0)
            if p.exitcode is None:
                p.kill()
        for r in list(self._requests.values()):
            self.service.cancel(r)
        self._send([b"", b"stop"])  # the I/O thread exits on it
        if self._io is not None:
            self._io.join(5)
        self._push.close(linger=0)
        self.ctx.term()
        try:
            os.unlink(os.path.join(self._dir, "hub"))
            os.rmdir(self._dir)
        except OSError:
            pass

    # -- the I/O thread ---------------------------------------------------------------------------
    def _io_thread(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._pull in events:
                    while True:
                        try:
                            frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if not frames[0].bytes and frames[1].bytes == b"stop":
                            return
                        self.sock.send_multipart(frames, copy=False)
                if self.sock in events:
                    batch = []
                    while len(batch) < 512:
                        try:
                            batch.append(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                    if batch:
                        self.loop.call_soon_threadsafe(self._on_messages, batch)
        except zmq.ContextTerminated:
            pass
        finally:
            self.sock.close(linger=0)
            self._pull.close(linger=0)

    def _send(self, frames: list) -> None:
        """Queue a message for the I/O thread (event loop thread only)."""
        self._push.send_multipart(frames, copy=False)

    # -- the event loop ---------------------------------------------------------------------------
    def _on_messages(self, batch: list) -> None:
        for frames in batch:
            wid, kind = frames[0].bytes, frames[1].bytes
            try:
                if kind == b"infer":
                    self._infer(wid, frames[2].bytes, frames[3].bytes, frames[4])
                elif kind == b"cancel":
                    r = self._requests.pop((wid, frames[2].bytes), None)
                    if r is not None:
                        self.service.cancel(r)
                elif kind == b"answered":
                    for protocol, seconds, reason in json.loads(frames[2].bytes):
                        self.service.metrics.answered(protocol, float(seconds), reason)
                elif kind == b"metrics":
                    self._send([wid, b"metrics", self.service.metrics.exposition()])
                elif kind == b"hello":
                    self._workers[int(json.loads(frames[2].bytes)["index"])] = wid
                    self._hello.set()
                    self._send([wid, b"status", json.dumps({"ready": bool(self.service.ready())}).encode()])
                else:
                    log.warning("front worker sent an unknown message kind %r: dropped", kind[:32])
            except (IndexError, ValueError, KeyError, TypeError) as exc:
                log.warning("front worker sent a malformed %r message (%s): dropped", kind[:32], exc)

    def _infer(self, wid: bytes, rid: bytes, header: bytes, data: zmq.Frame) -> None:
        try:
            try:
                h = json.loads(header)
                model = self.service.model
                images = np.frombuffer(data.buffer, dtype=np.dtype(h["dtype"])).reshape(h["shape"])
                if images.dtype != model.hop_dtype or tuple(images.shape[1:]) != tuple(model.input_shape):
                    raise InferError(f"front worker sent {images.dtype} {list(images.shape)} images; the first hop "
                                     f"takes {model.hop_dtype} [N, {', '.join(map(str, model.input_shape))}]", 500,
                                     "internal")
            except (ValueError, KeyError, TypeError) as exc:
                raise InferError(f"front worker sent a malformed request ({exc})", 500, "internal") from None
            r = self.service.submit_nowait(images, int(h.get("requests", 1)))
        except InferError as exc:
            self._error(wid, rid, exc)
            return
        self._requests[(wid, rid)] = r
        r.future.add_done_callback(lambda f: self._answer(wid, rid, f))

    def _answer(self, wid: bytes, rid: bytes, fut: asyncio.Future) -> None:
        self._requests.pop((wid, rid), None)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, InferError):
                self._error(wid, rid, exc)
            else:  # a bug: the worker's client still gets an answer
                log.error("serve hub: a request failed: %r", exc)
                self._error(wid, rid, InferError("internal server error (see the server's log)", 500, "internal"))
            return
        y = np.ascontiguousarray(fut.result(), dtype=np.float32)
        self._send([wid, b"result", rid, json.dumps({"shape": list(y.shape)}).encode(), y])

    def _error(self, wid: bytes, rid: bytes, exc: InferError) -> None:
        self._send([wid, b"error", rid, json.dumps({"message": str(exc), "status": exc.status,
                                                    "reason": exc.reason}).encode()])

    async def _watch(self) -> None:
        mp = multiprocessing.get_context("spawn")
        while not self._closing:
            await asyncio.sleep(0.5)
            for k, p in enumerate(self._procs):
                if p.exitcode is not None and not self._closing:
                    log.error("front worker %d exited with %s: starting it again", k, p.exitcode)
                    self._procs[k] = self._spawn(mp, k)

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(_STATUS_EVERY_S)
            body = json.dumps({"ready": bool(self.service.ready())}).encode()
            for wid in list(self._workers.values()):
                self._send([wid, b"status", body])


# --------------------------------------------------------------------------------------------- worker
class _Metrics:
    """What the fronts call on ``service.metrics``, forwarded to the hub's registry."""

    def __init__(self, remote: "RemoteService") -> None:
        self.remote = remote
        self._outcomes: list[tuple[str, float, str]] = []

    def answered(self, protocol: str, seconds: float, reason: str = "") -> None:
        # sent to the hub in batches, every 0.1 s at most: one message per request would cost the hub more
        # than the request itself
        if not self._outcomes:
            self.remote.loop.call_later(0.1, self._flush)
        self._outcomes.append((protocol, seconds, reason))

    def _flush(self) -> None:
        outcomes, self._outcomes = self._outcomes, []
        self.remote.send_nowait([b"answered", json.dumps(outcomes).encode()])

    async def exposition(self) -> bytes:
        return await self.remote.metrics_text()


class _Queue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity


class _Options:
    def __init__(self, spec: WorkerSpec) -> None:
        self.timeout_s = spec.timeout_s
        self.max_queue_delay_us = spec.max_queue_delay_us


class _Cfg:
    def __init__(self, microbatch: int) -> None:
        self.microbatch = microbatch


class RemoteService:
    """The :class:`~quantpipe.serve.service.InferenceService` interface the fronts use, in a worker:
    conversion and outputs here, the pipeline in the hub."""

    def __init__(self, spec: WorkerSpec, index: int = 0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.spec, self.index = spec, index
        self.model = spec.model
        self.options = _Options(spec)
        self.queue = _Queue(spec.queue_capacity)
        self.cfg = _Cfg(spec.microbatch)
        self.metrics = _Metrics(self)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(spec.endpoint)
        self._ids = itertools.count(1)
        # hub request id -> (the client requests' futures, their image counts)
        self._pending: dict[bytes, tuple[list[asyncio.Future], list[int]]] = {}
        self._batch: list[tuple[np.ndarray, asyncio.Future]] = []  # client requests of this loop iteration
        self._metrics: list[asyncio.Future] = []
        self._ready = False
        self._heard = 0.0
        self._decoder = ThreadPoolExecutor(spec.decode_workers, thread_name_prefix="quantpipe-serve-decode")
        self._task: asyncio.Task | None = None
        self._out: asyncio.Queue = asyncio.Queue()
        self._sender: asyncio.Task | None = None
        self.loop = asyncio.get_running_loop()  # made on the worker's event loop, before the fronts listen

    def start(self) -> None:
        self._task = asyncio.create_task(self._receive())
        self._sender = asyncio.create_task(self._send_loop())
        self.send_nowait([b"hello", json.dumps({"index": self.index, "pid": os.getpid()}).encode()])

    def stop(self) -> None:
        for t in (self._task, self._sender):
            if t is not None:
                t.cancel()
        for futs, _ in self._pending.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(InferError("the server is shutting down", 503, "shutting_down"))
        self.sock.close(linger=0)
        self.ctx.term()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def hub_alive(self) -> bool:
        return time.monotonic() - self._heard < _HUB_LOST_S

    def ready(self) -> bool:
        return self._ready and self.hub_alive()

    def send_nowait(self, frames: list) -> None:
        self._out.put_nowait(frames)

    async def _send_loop(self) -> None:
        while True:
            frames = await self._out.get()
            await self.sock.send_multipart(frames, copy=False)

    async def metrics_text(self) -> bytes:
        fut = self.loop.create_future()
        self._metrics.append(fut)
        self.send_nowait([b"metrics"])
        try:
            return await asyncio.wait_for(fut, _HUB_LOST_S)
        except asyncio.TimeoutError:
            raise InferError("the serving hub did not answer (it may be restarting)", 503, "hub_unavailable") from None

    async def _receive(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            kind = frames[0].bytes
            self._heard = time.monotonic()
            if kind == b"status":
                self._ready = bool(json.loads(frames[1].bytes)["ready"])
            elif kind in (b"result", b"error"):
                entry = self._pending.pop(frames[1].bytes, None)
                if entry is None:
                    continue
                futs, counts = entry
                if kind == b"result":
                    shape = json.loads(frames[2].bytes)["shape"]
                    y = np.frombuffer(frames[3].buffer, dtype=np.float32).reshape(shape)
                    parts = np.split(y, np.cumsum(counts)[:-1])
                    for fut, part in zip(futs, parts):
                        if not fut.done():
                            fut.set_result(part)
                else:
                    e = json.loads(frames[2].bytes)
                    for fut in futs:
                        if not fut.done():
                            fut.set_exception(InferError(e["message"], int(e["status"]), e["reason"]))
            elif kind == b"metrics":
                while self._metrics:
                    fut = self._metrics.pop(0)
                    if not fut.done():
                        fut.set_result(frames[1].bytes)
                        break

    async def infer(self, request: InferRequest) -> list[tuple[str, str, np.ndarray, bool]]:
        """What :meth:`InferenceService.infer` does, with the pipeline part sent to the hub."""
        images = await first_hop_images(self.model, request, self.loop, self._decoder)
        if not self.hub_alive():  # a stage that is down is the hub's to wait for, as without workers
            raise InferError("the serving hub does not answer (it is stopping or stopped)", 503, "hub_unavailable")
        fut = self.loop.create_future()
        if not self._batch:
            self.loop.call_soon(self._flush)
        self._batch.append((images, fut))
        try:
            # the hub answers every request within its timeout; the margin covers a hub that died
            y = await asyncio.wait_for(fut, self.spec.timeout_s + _HUB_LOST_S)
        except asyncio.TimeoutError:
            raise InferError("the serving hub did not answer within the timeout", 504, "timeout") from None
        return self.model.outputs(y, request.outputs, request.binary_default)

    def _flush(self) -> None:
        """Send the client requests that arrived in this loop iteration as one hub request.

        Under load many requests arrive per iteration; the hub then handles one request (one message,
        one queue entry, one result) for all of them instead of one each, which is what keeps the hub,
        a single process, from limiting N workers. Idle, a request goes alone, with no added wait."""
        batch, self._batch = self._batch, []
        batch = [(x, f) for x, f in batch if not f.done()]  # a client that went away meanwhile
        if not batch:
            return
        counts = [len(x) for x, _ in batch]
        images = np.ascontiguousarray(batch[0][0]) if len(batch) == 1 else np.concatenate([x for x, _ in batch])
        rid = _RID.pack(next(self._ids))
        futs = [f for _, f in batch]
        self._pending[rid] = (futs, counts)
        for f in futs:
            f.add_done_callback(lambda _f, rid=rid: self._abandoned(rid))
        head = json.dumps({"dtype": images.dtype.str, "shape": list(images.shape), "requests": len(futs)}).encode()
        self.send_nowait([b"infer", rid, head, images])

    def _abandoned(self, rid: bytes) -> None:
        """When every client of a hub request has gone (cancelled or timed out), the hub frees its place."""
        entry = self._pending.get(rid)
        if entry is not None and all(f.cancelled() for f in entry[0]):
            del self._pending[rid]
            self.send_nowait([b"cancel", rid])


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def worker_main(spec: WorkerSpec, index: int) -> None:
    """A worker process: the HTTP and/or gRPC front on the shared ports, the pipeline in the hub."""
    _die_with_parent(spec.parent)
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname).1s %(name)s[w{index}]: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        asyncio.run(_serve_worker(spec, index))
    except KeyboardInterrupt:
        pass


async def _serve_worker(spec: WorkerSpec, index: int) -> None:
    from quantpipe.serve.observe import AccessLog

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = RemoteService(spec, index)
    access = AccessLog(logging.getLogger("quantpipe.serve.access"), spec.access_log_per_s)
    fronts = []
    if spec.http is not None:
        from quantpipe.serve.http_front import HttpFront

        fronts.append(HttpFront(service, *spec.http, token=spec.token, max_body_bytes=spec.max_body_bytes,
                                access_log=access, reuse_port=True))
    if spec.grpc is not None:
        from quantpipe.serve.grpc_front import GrpcFront

        fronts.append(GrpcFront(service, *spec.grpc, token=spec.token, max_message_bytes=spec.max_body_bytes,
                                access_log=access, reuse_port=True))
    for f in fronts:
        await f.start()
    service.start()  # hello: the hub counts this worker as listening
    try:
        await stop.wait()
    finally:
        for f in fronts:
            await f.stop()
        service.stop()
