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
  JSON dtype and shape of the first-hop images of one client request) | ``cancel rid`` (its client went
  away) | ``answered json`` (the outcomes of the requests answered in the last 0.1 s, for the
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
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import zmq
import zmq.asyncio  # the workers' side; the hub uses plain ZeroMQ in its I/O thread

from quantpipe.errors import QuantpipeError
from quantpipe.serve.model import ServedModel
from quantpipe.serve.protocol import InferError, InferRequest
from quantpipe.serve.service import ServeOptions, first_hop_images

__all__ = ["WorkerSpec", "Hub", "RemoteService", "PortHold"]

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
    options: ServeOptions  # the hub's: timeouts and batching delay (reported, enforced by the hub), decoders
    queue_capacity: int
    microbatch: int
    log_level: int
    parent: int


class PortHold:
    """A port held for the front workers: a bound, not listening, ``SO_REUSEPORT`` socket, and a lock
    file that another ``quantpipe serve`` asking for the same port finds taken.

    Connections only go to listening sockets, so the held socket steals none; it keeps a port-0 choice
    and the port itself while workers start and restart. ``SO_REUSEPORT`` alone would let a second server
    of this user share the port silently: the probe (a plain bind, which fails on a listening socket)
    and the lock refuse that, as a single-process server refuses a taken port."""

    def __init__(self, host: str, port: int) -> None:
        import fcntl

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lock = None
        self.sock: socket.socket | None = None
        if port:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
            path = Path(tempfile.gettempdir()) / f"quantpipe-serve-{host.replace(':', '_')}-{port}.lock"
            self._lock = open(path, "a+")  # noqa: SIM115 - held for the server's lifetime
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise OSError(f"{host}:{port} is held by another quantpipe serve (lock {path})") from None
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.close()
            raise
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._lock is not None:
            self._lock.close()  # releases the lock (the file stays, empty, for the next server)
            self._lock = None


# ------------------------------------------------------------------------------------------------ hub
class Hub:
    """The main process's side: a ROUTER that turns worker messages into
    :meth:`InferenceService.submit_nowait` calls, and the N worker processes it starts, watches and restarts.

    The ROUTER belongs to one I/O thread (plain blocking ZeroMQ): it drains every message that is
    waiting and hands the batch to the event loop in one call, and sends what the loop queues for it
    (an inproc PUSH/PULL pair wakes it), so the event loop spends no task and no asyncio socket
    machinery per request.
    """

    def __init__(self, service: Any, spec: WorkerSpec, workers: int) -> None:
        self.service, self.spec, self.n = service, spec, workers
        self._dir = tempfile.mkdtemp(prefix="qp-serve-")  # mkdtemp: mode 0700, only this user may connect
        self.endpoint = f"ipc://{self._dir}/hub"
        self.spec.endpoint = self.endpoint
        # one ZeroMQ I/O thread moves about 1-2 GB/s: the hub receives every worker's images
        self.ctx = zmq.Context(io_threads=max(1, min(4, workers // 2)))
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops at its high-water mark: results must not be lost
        try:
            self.sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self.sock.close(linger=0)
            self.ctx.term()
            os.rmdir(self._dir)
            raise QuantpipeError(f"the front workers' hub cannot listen on {self.endpoint} ({exc}); set TMPDIR "
                                 "to a short, writable directory") from None
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
        self._stopping = False  # no more restarts
        self._closed = False  # the I/O thread is told to stop: nothing more is sent
        self._io: Any = None

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start the workers and wait until each has said hello (its ports are listening)."""
        self.loop = asyncio.get_running_loop()
        self._io = threading.Thread(target=self._io_thread, name="quantpipe-serve-hub", daemon=True)
        self._io.start()
        self._loops = [asyncio.create_task(self._status())]
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
        self._loops.append(asyncio.create_task(self._watch()))

    def _spawn(self, mp: Any, k: int) -> Any:
        p = mp.Process(target=worker_main, args=(self.spec, k), name=f"quantpipe-serve-worker-{k}", daemon=True)
        p.start()
        return p

    async def stop(self) -> None:
        """Stop the workers as a single-process server stops its fronts: each one finishes the requests
        it holds (the hub keeps answering them) within their timeout, then exits; then the hub stops."""
        self._stopping = True
        for p in self._procs:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + self.spec.options.timeout_s + _HUB_LOST_S + 5.0
        while any(p.exitcode is None for p in self._procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in self._procs:
            if p.exitcode is None:
                log.warning("front worker %s did not exit in time: killed", p.name)
                p.kill()
                p.join(5)
        for t in self._loops:
            t.cancel()
        for r in list(self._requests.values()):
            self.service.cancel(r)
        await asyncio.sleep(0)  # let the answers' callbacks run while the socket is open (nobody reads them)
        self._closed = True
        self._push.send_multipart([b"", b"stop"])  # the I/O thread exits on it
        if self._io is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._io.join, 5.0)
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
        """Queue a message for the I/O thread (event loop thread only); nothing once the hub has stopped."""
        if not self._closed:
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
                    self._send([wid, b"status", self._status_body()])
                else:
                    log.warning("front worker sent an unknown message kind %r: dropped", kind[:32])
            except (IndexError, ValueError, KeyError, TypeError) as exc:
                log.warning("front worker sent a malformed %r message (%s): dropped", kind[:32], exc)
            except Exception:  # a bug: the other messages of the batch still get handled
                log.exception("serve hub: handling a %r message failed", kind[:32])

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
            r = self.service.submit_nowait(images)
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
        """Start a worker that died again; one that keeps dying soon after its start waits longer each
        time (0.5 s doubling to 30 s), so a broken worker does not spin."""
        mp = multiprocessing.get_context("spawn")
        started = {k: time.monotonic() for k in range(self.n)}
        backoff = {k: 0.5 for k in range(self.n)}
        due: dict[int, float] = {}
        while not self._stopping:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for k, p in enumerate(self._procs):
                if p.exitcode is None or self._stopping:
                    continue
                if k not in due:
                    backoff[k] = min(30.0, backoff[k] * 2) if now - started[k] < 10.0 else 0.5
                    due[k] = now + backoff[k]
                    log.error("front worker %d exited with %s: starting it again in %.1f s", k, p.exitcode, backoff[k])
                elif now >= due[k]:
                    del due[k]
                    started[k] = now
                    self._procs[k] = self._spawn(mp, k)

    def _status_body(self) -> bytes:
        return json.dumps({"ready": bool(self.service.ready())}).encode()

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(_STATUS_EVERY_S)
            body = self._status_body()
            for wid in list(self._workers.values()):
                self._send([wid, b"status", body])


# --------------------------------------------------------------------------------------------- worker
class _Metrics:
    """What the fronts call on ``service.metrics``, forwarded to the hub's registry."""

    def __init__(self, remote: "RemoteService") -> None:
        self.remote = remote
        self._outcomes: list[tuple[str, float, str]] = []

    def answered(self, protocol: str, seconds: float, reason: str = "") -> None:
        # sent to the hub in batches, every 0.1 s at most, not as a second message per request
        if not self._outcomes:
            self.remote.loop.call_later(0.1, self._flush)
        self._outcomes.append((protocol, seconds, reason))

    def _flush(self) -> None:
        outcomes, self._outcomes = self._outcomes, []
        self.remote.send_nowait([b"answered", json.dumps(outcomes).encode()])

    async def exposition(self) -> bytes:
        return await self.remote.metrics_text()


class RemoteService:
    """The :class:`~quantpipe.serve.service.InferenceService` interface the fronts use, in a worker:
    conversion and outputs here, the pipeline in the hub."""

    def __init__(self, spec: WorkerSpec, index: int = 0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.spec, self.index = spec, index
        self.model = spec.model
        self.options = spec.options
        # what the fronts read of the hub's queue and config (Triton's model config endpoint)
        self.queue = SimpleNamespace(capacity=spec.queue_capacity)
        self.cfg = SimpleNamespace(microbatch=spec.microbatch)
        self.metrics = _Metrics(self)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # the same routing id after a reconnect, so the hub's answers still find this worker
        self.sock.setsockopt(zmq.ROUTING_ID, f"w{index}-{os.getpid()}".encode())
        self.sock.connect(spec.endpoint)
        self._ids = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future] = {}  # request id -> the client request's future
        self._metrics: list[asyncio.Future] = []
        self._ready = False
        self._heard = 0.0
        self._decoder = ThreadPoolExecutor(spec.options.decode_workers, thread_name_prefix="quantpipe-serve-decode")
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
        for fut in self._pending.values():
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
            try:
                self._dispatch(frames)
            except Exception:  # a bug or a malformed message: the worker keeps serving
                log.exception("front worker: handling a message from the hub failed")

    def _dispatch(self, frames: list) -> None:
        kind = frames[0].bytes
        self._heard = time.monotonic()
        if kind == b"status":
            self._ready = bool(json.loads(frames[1].bytes)["ready"])
        elif kind in (b"result", b"error"):
            fut = self._pending.get(frames[1].bytes)
            if fut is None or fut.done():
                return
            if kind == b"result":
                shape = json.loads(frames[2].bytes)["shape"]
                fut.set_result(np.frombuffer(frames[3].buffer, dtype=np.float32).reshape(shape))
            else:
                e = json.loads(frames[2].bytes)
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
        images = np.ascontiguousarray(images)
        rid = _RID.pack(next(self._ids))
        fut = self.loop.create_future()
        self._pending[rid] = fut
        head = json.dumps({"dtype": images.dtype.str, "shape": list(images.shape)}).encode()
        self.send_nowait([b"infer", rid, head, images])
        try:
            # the hub answers every request within its timeout; the margin covers a hub that died
            y = await asyncio.wait_for(fut, self.options.timeout_s + _HUB_LOST_S)
        except asyncio.TimeoutError:
            raise InferError("the serving hub did not answer within the timeout", 504, "timeout") from None
        except asyncio.CancelledError:  # the client went away: the hub frees its place in the queue
            self.send_nowait([b"cancel", rid])
            raise
        finally:
            self._pending.pop(rid, None)
        return self.model.outputs(y, request.outputs, request.binary_default)


def worker_main(spec: WorkerSpec, index: int) -> None:
    """A worker process: the HTTP and/or gRPC front on the shared ports, the pipeline in the hub."""
    from quantpipe.runtime.launcher import die_with_parent

    die_with_parent(signal.SIGTERM, spec.parent)
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname).1s %(name)s[w{index}]: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        asyncio.run(_serve_worker(spec, index))
    except KeyboardInterrupt:
        pass


async def _serve_worker(spec: WorkerSpec, index: int) -> None:
    from quantpipe.serve.command import start_fronts

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = RemoteService(spec, index)
    fronts = await start_fronts(service, spec.http, spec.grpc, token=spec.token, max_body_bytes=spec.max_body_bytes,
                                access_log_per_s=spec.access_log_per_s, reuse_port=True)
    service.start()  # hello: the hub counts this worker as listening
    try:
        await stop.wait()
    finally:
        for f in fronts:
            if f is not None:
                await f.stop()
        service.stop()
