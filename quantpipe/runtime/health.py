"""HTTP health and readiness endpoints of a daemon (stdlib ``http.server`` in a thread).

* ``GET /healthz``: *liveness*. 200 while the daemon's loop has ticked within ``stale_after_s``; 503
  when it has not (hung: deadlocked, stuck in a native call, or never started). A daemon blocked on
  credit from a slow downstream still ticks (it services its links while it waits), so backpressure is
  not mistaken for a hang.
* ``GET /readyz``: *readiness*. 200 when live and every required fact is true (for a stage: engine
  loaded, upstream heard from, downstream heard from); 503 otherwise, naming what is missing.

Both answer a small JSON document, e.g.
``{"status": "ok", "loop_age_s": 0.01, "facts": {"engine": true, "upstream": true, "downstream": true}}``.

The daemon's loop reports with :meth:`Health.beat` (one call per iteration; it stores one immutable
snapshot, so the HTTP thread never touches the loop's own objects while they change)::

    health = Health(required=("engine", "upstream", "downstream"))
    HealthServer(health, port).start()
    ...
    health.beat(**stage_facts(daemon))    # in the loop and in the wait-for-credit idle callback
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

__all__ = ["Health", "HealthServer", "stage_facts"]

log = logging.getLogger(__name__)


class Health:
    """What the daemon's loop last reported, and the liveness/readiness verdicts drawn from it.

    Args:
        required: fact names that must all be true for readiness.
        stale_after_s: the loop counts as hung when it has not ticked for this long.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, required: Iterable[str] = (), stale_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.required = tuple(required)
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.started = clock()
        # (time of the last tick or None, facts): replaced as a whole, read without a lock.
        self._snapshot: tuple[float | None, dict[str, bool]] = (None, {})

    def beat(self, **facts: bool) -> None:
        """The loop is alive; ``facts`` (e.g. ``upstream=True``) update the readiness facts."""
        _, old = self._snapshot
        self._snapshot = (self.clock(), {**old, **{k: bool(v) for k, v in facts.items()}})

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        last, _ = self._snapshot
        now = self.clock()
        if last is None:
            return False, {"status": "starting", "uptime_s": round(now - self.started, 3)}
        age = now - last
        ok = age <= self.stale_after_s
        return ok, {"status": "ok" if ok else "stalled", "loop_age_s": round(age, 3),
                    "stale_after_s": self.stale_after_s, "uptime_s": round(now - self.started, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        alive, body = self.liveness()
        _, facts = self._snapshot
        missing = [name for name in self.required if not facts.get(name, False)]
        ok = alive and not missing
        body = {**body, "status": "ready" if ok else "not ready", "facts": dict(facts)}
        if missing:
            body["missing"] = missing
        return ok, body


def stage_facts(daemon: Any) -> dict[str, bool]:
    """Readiness facts of a :class:`~quantpipe.runtime.stage.StageDaemon` (read in its own loop)."""
    return {"engine": getattr(daemon, "engine", None) is not None,
            "upstream": bool(daemon.inbound.peer_alive()),
            "downstream": bool(daemon.outbound.peer_alive()),
            "stopping": bool(getattr(daemon, "stopping", False))}


class _Handler(BaseHTTPRequestHandler):
    health: Health  # set on the per-server subclass
    server_version = "quantpipe-health"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok, body = self.health.liveness()
        elif path == "/readyz":
            ok, body = self.health.readiness()
        else:
            self._reply(404, {"status": "not found", "endpoints": ["/healthz", "/readyz"]})
            return
        self._reply(200 if ok else 503, body)

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        # Probes hit these every few seconds: keep them out of the daemon's log unless asked.
        log.debug("health %s: " + fmt, self.client_address[0], *args)


class HealthServer:
    """Serves ``/healthz`` and ``/readyz`` for ``health`` on ``addr:port`` from a daemon thread.

    Args:
        health: the state to report.
        port: TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        addr: interface to bind. Loopback by default; bind the device's address where an orchestrator
            on another machine probes it.
    """

    def __init__(self, health: Health, port: int, addr: str = "127.0.0.1") -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"health port {port} is not a port (0 picks a free one)")
        self.health, self.addr, self.port = health, addr, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        handler = type("HealthHandler", (_Handler,), {"health": self.health})
        try:
            self._server = ThreadingHTTPServer((self.addr, self.port), handler)
        except OSError as exc:
            from quantpipe.errors import QuantpipeError

            raise QuantpipeError(f"cannot serve health endpoints on {self.addr}:{self.port} ({exc}): "
                                 "choose a free port") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"health:{self.port}", daemon=True)
        self._thread.start()
        log.info("health on http://%s:%d/healthz and /readyz", self.addr, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
