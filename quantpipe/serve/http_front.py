"""KServe v2 over HTTP/REST (aiohttp), with the binary tensor data and classification extensions.

Endpoints (``{model}`` may be followed by ``/versions/1``):

=====================================  ==========================================================
``GET  /v2/health/live``               200 while the server runs (never needs the token)
``GET  /v2/health/ready``              200 while stage 0 and the last stage are heard from, else 503
``GET  /v2``                           server metadata and extensions
``GET  /v2/models/{model}``            model metadata (inputs ``input``/``pixels``/``image``, output ``logits``)
``GET  /v2/models/{model}/ready``      200 when ready, 503 when not, 404 for an unknown model
``GET  /v2/models/{model}/config``     a Triton-style model config (max_batch_size, dynamic batching)
``POST /v2/models/{model}/infer``      inference
``POST /v2/repository/index``          the one model, its version and state
``GET  /metrics``                      Prometheus metrics of the front
=====================================  ==========================================================

Every error is ``{"error": "..."}`` with a fitting status: 400 bad request, 401 missing or wrong
token, 404 unknown model or path, 413 body over ``--max-body-mb``, 500 a stage failed on the request,
503 queue full or not ready, 504 no result within the timeout.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web

from quantpipe import __version__
from quantpipe.serve.model import VERSION
from quantpipe.serve.observe import AccessLog, token_matches
from quantpipe.serve.protocol import InferError, encode_http_response, parse_http_request
from quantpipe.serve.service import InferenceService

__all__ = ["HttpFront", "EXTENSIONS"]

log = logging.getLogger("quantpipe.serve.access")

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
_JSON = "application/json"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps({"error": message}).encode(), content_type=_JSON,
                        headers=headers)


class HttpFront:
    """The HTTP server of one :class:`InferenceService`.

    Args:
        service: the pipeline behind it.
        host, port: where to listen (port 0: a free one; see :attr:`port` after :meth:`start`).
        token: bearer token every non-health request must carry (None: no auth).
        max_body_bytes: largest request body accepted (413 above).
        access_log: the rate-limited access log.
        backlog: listen backlog (64 clients connecting at once must not be refused).
        reuse_port: listen with ``SO_REUSEPORT`` (the front workers of ``serve --workers N`` share the port).
    """

    def __init__(self, service: InferenceService, host: str = "127.0.0.1", port: int = 8000, *,
                 token: str | None = None, max_body_bytes: int = 64 << 20, access_log: AccessLog | None = None,
                 backlog: int = 1024, reuse_port: bool = False) -> None:
        self.service, self.host, self.port = service, host, port
        self.reuse_port = reuse_port
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.access = access_log or AccessLog(log)
        self.backlog = backlog
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._middleware])
        r = self.app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_get("/metrics", self.metrics)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_post(base + "/infer", self.infer)

    async def start(self) -> int:
        """Listen; returns the port."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=self.backlog, reuse_address=True,
                           reuse_port=self.reuse_port or None)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real one when 0 was asked for
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- middleware: auth, errors, access log -----------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        reason = ""
        if self.token is not None and request.path not in _OPEN_PATHS and \
                not token_matches(request.headers.get("Authorization"), self.token):
            reason = "unauthorized"
            response = _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                              {"WWW-Authenticate": "Bearer"})
        else:
            try:
                response = await handler(request)
            except InferError as exc:
                reason = exc.reason
                response = _error(exc.status, str(exc))
            except web.HTTPRequestEntityTooLarge:
                reason = "too_large"
                response = _error(413, f"request body exceeds {self.max_body_bytes} bytes: send fewer images per "
                                       "request or raise --max-body-mb")
            except web.HTTPException as exc:  # no route (404), wrong method (405), ...
                reason = "bad_path" if exc.status == 404 else "bad_request"
                response = _error(exc.status, f"{request.method} {request.path}: {exc.reason}")
            except Exception:  # a bug: keep the traceback in the log, answer in the protocol's form
                log.exception("serve: %s %s failed", request.method, request.path)
                reason = "internal"
                response = _error(500, "internal server error (see the server's log)")
        seconds = time.perf_counter() - t0
        if request.path.endswith("/infer"):
            self.service.metrics.answered("http", seconds, reason)
        self.access.line(request.remote or "-", request.method, request.path, response.status, seconds, reason)
        return response

    # -- endpoints --------------------------------------------------------------------------------
    def _model(self, request: web.Request) -> None:
        name = request.match_info["model"]
        if name != self.service.model.name:
            raise InferError(f"unknown model '{name}': this server serves '{self.service.model.name}'", 404,
                             "unknown_model")
        self.service.model.check_version(request.match_info.get("version"))

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.service.ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "quantpipe", "version": __version__, "extensions": EXTENSIONS})

    async def repository_index(self, request: web.Request) -> web.Response:
        state = "READY" if self.service.ready() else "UNAVAILABLE"
        return web.json_response([{"name": self.service.model.name, "version": VERSION, "state": state}])

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.service.metrics.exposition()
        if not isinstance(body, bytes):  # a front worker asks the hub, which holds the registry
            body = await body
        return web.Response(body=body,
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._model(request)
        return web.json_response(self.service.model.metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)
        ok = self.service.ready()
        return web.json_response({"name": self.service.model.name, "ready": ok}, status=200 if ok else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        self._model(request)
        md = self.service.model.metadata()
        opts = self.service.options
        config: dict[str, Any] = {
            "name": md["name"], "platform": "quantpipe", "max_batch_size": self.service.cfg.microbatch,
            "input": [{"name": i["name"], "data_type": "TYPE_" + ("STRING" if i["datatype"] == "BYTES" else i["datatype"]),
                       "dims": i["shape"][1:]} for i in md["inputs"]],
            "output": [{"name": o["name"], "data_type": "TYPE_FP32", "dims": o["shape"][1:]} for o in md["outputs"]],
            "dynamic_batching": {"max_queue_delay_microseconds": opts.max_queue_delay_us,
                                 "default_queue_policy": {"max_queue_size": self.service.queue.capacity,
                                                          "default_timeout_microseconds": int(opts.timeout_s * 1e6)}},
        }
        return web.json_response(config)

    async def infer(self, request: web.Request) -> web.Response:
        self._model(request)
        body = await request.read()
        header_len = request.headers.get("Inference-Header-Content-Length")
        try:
            hlen = int(header_len) if header_len is not None else None
        except ValueError:
            raise InferError(f"Inference-Header-Content-Length {header_len!r} is not an integer") from None
        req = parse_http_request(body, hlen)
        outputs = await self.service.infer(req)
        payload, json_len = encode_http_response(self.service.model.name, VERSION, req.id, outputs)
        if json_len is None:
            return web.Response(body=payload, content_type=_JSON)
        return web.Response(body=payload, headers={"Content-Type": "application/octet-stream",
                                                   "Inference-Header-Content-Length": str(json_len)})
