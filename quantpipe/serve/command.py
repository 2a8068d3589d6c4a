"""``quantpipe serve``: the pipeline as a KServe v2 inference service (HTTP/REST and gRPC).

The server takes the place of the source and the sink: it connects to ``stages[0].address`` and binds
``[sink].address`` (the last stage connects to it); no ``[source]`` section is needed. Start the stage
daemons as usual (``quantpipe stage --config PIPELINE.toml --stage K``), then::

    quantpipe serve --config PIPELINE.toml --http 127.0.0.1:8000 --grpc 127.0.0.1:8001

It binds 127.0.0.1 unless told otherwise; ``--token-file`` requires ``Authorization: Bearer <token>``
on every request but the health checks. With ``keys_dir`` set the links use CURVE with the keys named
``source`` (to stage 0) and ``sink`` (from the last stage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from typing import Any

import zmq

from quantpipe.errors import ConfigError, QuantpipeError
from quantpipe.runtime.config import PipelineConfig, load_config

__all__ = ["add_arguments", "run", "Server", "parse_hostport", "start_fronts"]

log = logging.getLogger("quantpipe.serve")


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} {value!r}: write HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "127.0.0.1", int(port)


def _context(cfg: PipelineConfig) -> zmq.Context:
    if not cfg.keys_dir:
        return zmq.Context()
    from quantpipe.runtime import security

    n = len(cfg.stages)
    _, client = security.for_process(cfg.keys_dir, -1, n)  # the source's key: stage 0 allows it
    server, _ = security.for_process(cfg.keys_dir, n, n)  # the sink's key: the last stage knows it
    return security.SecureContext(server, client)


async def start_fronts(service: Any, http: tuple[str, int] | None, grpc: tuple[str, int] | None, *,
                       token: str | None, max_body_bytes: int, access_log_per_s: float,
                       reuse_port: bool = False) -> tuple[Any, Any]:
    """The HTTP and/or gRPC front of ``service``, listening: ``(HttpFront or None, GrpcFront or None)``
    (their ``port`` is the real one when 0 was asked for). Used by :class:`Server` and by each front
    worker process (``reuse_port``: they share the ports)."""
    from quantpipe.serve.observe import AccessLog

    access = AccessLog(logging.getLogger("quantpipe.serve.access"), access_log_per_s)
    http_front = grpc_front = None
    if http is not None:
        from quantpipe.serve.http_front import HttpFront

        http_front = HttpFront(service, *http, token=token, max_body_bytes=max_body_bytes, access_log=access,
                               reuse_port=reuse_port)
        await http_front.start()
    if grpc is not None:
        from quantpipe.serve.grpc_front import GrpcFront

        grpc_front = GrpcFront(service, *grpc, token=token, max_message_bytes=max_body_bytes, access_log=access,
                               reuse_port=reuse_port)
        try:
            await grpc_front.start()
        except BaseException:  # e.g. the gRPC port is taken: the HTTP front must not stay up alone
            if http_front is not None:
                await http_front.stop()
            raise
    return http_front, grpc_front


class Server:
    """The service and its fronts on one event loop (what ``quantpipe serve`` runs; tests use it too).

    Args:
        cfg: the pipeline config.
        http: (host, port) of the HTTP front, or None; port 0 picks a free one.
        grpc: (host, port) of the gRPC front, or None.
        model_name, first_hop: see :class:`~quantpipe.serve.model.ServedModel`.
        token: bearer token (None: no auth).
        options: :class:`~quantpipe.serve.service.ServeOptions`.
        max_body_bytes: largest HTTP body / gRPC message accepted.
        access_log_per_s: access log lines per second at most (0: none).
        workers: front processes (1: the fronts run on this process's event loop; N > 1: N worker
            processes share the ports and this process is the hub, :mod:`quantpipe.serve.workers`).
    """

    def __init__(self, cfg: PipelineConfig, *, http: tuple[str, int] | None = ("127.0.0.1", 8000),
                 grpc: tuple[str, int] | None = None, model_name: str = "", first_hop: str = "auto",
                 token: str | None = None, options: Any = None, max_body_bytes: int = 64 << 20,
                 access_log_per_s: float = 10.0, workers: int = 1) -> None:
        from quantpipe.serve.model import ServedModel
        from quantpipe.serve.service import ServeOptions

        if http is None and grpc is None:
            raise ConfigError("nothing to serve: give --http HOST:PORT and/or --grpc HOST:PORT")
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        if http is not None and grpc is not None and http[1] and tuple(http) == tuple(grpc):
            raise ConfigError(f"--http and --grpc both ask for {http[0]}:{http[1]}: give them different ports")
        self.workers = workers
        self.hub = None
        self._reserved: list = []
        self.cfg = cfg
        self.model = ServedModel.from_config(cfg, model_name, first_hop)
        self.options = options or ServeOptions()
        self.http_addr, self.grpc_addr = http, grpc
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.access_log_per_s = access_log_per_s
        self.service = None
        self.ctx = None
        self.http = self.grpc = None
        self.http_port = self.grpc_port = 0
        self._stop: asyncio.Event | None = None

    async def start(self) -> None:
        from quantpipe.serve.service import InferenceService

        self.ctx = _context(self.cfg)
        self.service = InferenceService(self.cfg, self.model, self.options, self.ctx)
        self.service.start()
        if self.workers > 1:
            await self._start_workers()
        else:
            await self._start_fronts()
        log.info("serving model '%s' (first hop %s, microbatch %d, queue %d images, delay %d us, timeout %g s)%s%s%s; "
                 "stage 0 at %s, results on %s%s", self.model.name, self.model.first_hop, self.cfg.microbatch,
                 self.service.queue.capacity, self.options.max_queue_delay_us, self.options.timeout_s,
                 f"; HTTP on {self.http_addr[0]}:{self.http_port}" if self.http_addr else "",
                 f"; gRPC on {self.grpc_addr[0]}:{self.grpc_port}" if self.grpc_addr else "",
                 f"; {self.workers} front worker processes" if self.workers > 1 else "",
                 self.cfg.stages[0].address, self.cfg.sink.address, "; bearer token required" if self.token else "")

    async def _start_workers(self) -> None:
        from quantpipe.serve.workers import Hub, PortHold, WorkerSpec

        addrs = {}
        for what, addr in (("http", self.http_addr), ("grpc", self.grpc_addr)):
            if addr is not None:
                hold = PortHold(*addr)
                self._reserved.append(hold)
                addrs[what] = (addr[0], hold.port)
        self.http_port = addrs["http"][1] if "http" in addrs else 0
        self.grpc_port = addrs["grpc"][1] if "grpc" in addrs else 0
        spec = WorkerSpec(endpoint="", model=self.model, http=addrs.get("http"), grpc=addrs.get("grpc"),
                          token=self.token, max_body_bytes=self.max_body_bytes,
                          access_log_per_s=self.access_log_per_s, options=self.options,
                          queue_capacity=self.service.queue.capacity, microbatch=self.cfg.microbatch,
                          log_level=logging.getLogger().level, parent=os.getpid())
        self.hub = Hub(self.service, spec, self.workers)
        await self.hub.start()

    async def _start_fronts(self) -> None:
        self.http, self.grpc = await start_fronts(self.service, self.http_addr, self.grpc_addr, token=self.token,
                                                  max_body_bytes=self.max_body_bytes,
                                                  access_log_per_s=self.access_log_per_s)
        self.http_port = self.http.port if self.http is not None else 0
        self.grpc_port = self.grpc.port if self.grpc is not None else 0

    async def stop(self) -> None:
        if self.hub is not None:
            await self.hub.stop()
        for hold in self._reserved:
            hold.close()
        if self.http is not None:
            await self.http.stop()
        if self.grpc is not None:
            await self.grpc.stop()
        if self.service is not None:
            self.service.stop()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)

    async def serve_forever(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        try:
            await self.start()
            await self._stop.wait()
        finally:  # also after a failed start: no worker, thread or socket is left behind
            await self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline TOML (stages, [sink].address)")
    parser.add_argument("--stages-dir", help="export directory (overrides pipeline.stages_dir)")
    parser.add_argument("--microbatch", type=int, help="most images per microbatch sent to stage 0 (overrides "
                        "pipeline.microbatch)")
    parser.add_argument("--credits", type=int, help="unacknowledged microbatches on the link to stage 0 "
                        "(overrides pipeline.credits)")
    parser.add_argument("--http", default="127.0.0.1:8000", help="HTTP/REST listen address (default 127.0.0.1:8000; "
                        "'' disables it)")
    parser.add_argument("--grpc", default="", help="gRPC listen address, e.g. 127.0.0.1:8001 (default: off)")
    parser.add_argument("--model-name", default="", help="model name clients use (default: the exported model's; "
                        "builtin pipelines: quantpipe-builtin)")
    parser.add_argument("--token-file", default="", help="require 'Authorization: Bearer <token>' (the file's "
                        "content, trailing newline stripped) on every request but the health checks")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take before it is "
                        "answered 504 / DEADLINE_EXCEEDED (default 30)")
    parser.add_argument("--max-queue-images", type=int, default=0,
                        help="images that may wait for a microbatch; more are refused at once with 503 "
                        "(default 64 x pipeline.microbatch)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000,
                        help="how long the oldest queued image waits for a fuller microbatch (default 2000)")
    parser.add_argument("--first-hop", default="auto", choices=("auto", "float32", "uint8"),
                        help="what the link to stage 0 carries: uint8 pixels (stage 0 must take pixels) or "
                        "float32 normalized images; auto: what the export's manifest says")
    parser.add_argument("--stall-timeout", type=float, default=10.0,
                        help="not ready while a microbatch has been in the pipeline this long (and 4x the slowest "
                        "seen): a stage between the ends is down (default 10 s)")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest request accepted, MB (413 above)")
    parser.add_argument("--decode-workers", type=int, default=2, help="threads decoding and resizing images "
                        "(per front worker)")
    parser.add_argument("--workers", type=int, default=1, help="front processes sharing the HTTP/gRPC ports "
                        "(SO_REUSEPORT); one Python process parses about 1,000 float32 224x224 images/s, so give "
                        "more where the pipeline is faster than that (default 1: no worker processes)")
    parser.add_argument("--access-log-per-s", type=float, default=10.0,
                        help="access log lines per second at most (0: no access log)")


def run(args: argparse.Namespace) -> int:
    from quantpipe.serve.observe import read_token
    from quantpipe.serve.service import ServeOptions

    cfg = load_config(args.config, {"stages_dir": args.stages_dir, "microbatch": args.microbatch,
                                    "credits": args.credits})
    try:
        options = ServeOptions(timeout_s=args.timeout, max_queue_images=args.max_queue_images,
                               max_queue_delay_us=args.max_queue_delay_us, decode_workers=args.decode_workers,
                               stall_s=args.stall_timeout)
    except ValueError as exc:
        raise ConfigError(f"{exc}: check --timeout, --max-queue-images, --max-queue-delay-us, --decode-workers, --stall-timeout") from None
    if args.max_body_mb <= 0:
        raise ConfigError("--max-body-mb must be > 0")
    server = Server(cfg, http=parse_hostport(args.http, "--http") if args.http else None,
                    grpc=parse_hostport(args.grpc, "--grpc") if args.grpc else None,
                    model_name=args.model_name, first_hop=args.first_hop,
                    token=read_token(args.token_file) if args.token_file else None, options=options,
                    max_body_bytes=int(args.max_body_mb * (1 << 20)), access_log_per_s=args.access_log_per_s,
                    workers=args.workers)
    log.info("config %s", json.dumps(cfg.to_dict(), sort_keys=True))
    try:
        asyncio.run(server.serve_forever())
    except OSError as exc:  # e.g. the port is taken
        raise QuantpipeError(f"cannot listen: {exc}") from None
    except zmq.ZMQError as exc:
        raise QuantpipeError(f"cannot bind [sink].address {cfg.sink.address}: {exc}") from None
    return 0
