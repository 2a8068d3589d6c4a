"""What the serving front tells operators: Prometheus metrics, a rate-limited access log, the token.

Metrics (own registry, served at ``GET /metrics`` on the HTTP port, Prometheus text format):

* ``quantpipe_serve_requests_total{protocol, outcome}``: answered requests (``ok`` or ``error``).
* ``quantpipe_serve_failures_total{protocol, reason}``: errors by reason (``queue_full``, ``timeout``,
  ``bad_request``, ``unauthorized``, ``unknown_model``, ``stage_engine``, ...).
* ``quantpipe_serve_request_seconds{protocol}``: request latency, arrival to answer.
* ``quantpipe_serve_queue_seconds``: time an image waited in the queue before its microbatch left.
* ``quantpipe_serve_batch_images``: images per microbatch sent (how well dynamic batching fills).
* ``quantpipe_serve_first_hop_bytes_total``, ``quantpipe_serve_images_sent_total``: what the link to
  stage 0 carried (float32 or uint8 first hop).
* ``quantpipe_serve_in_flight_requests``, ``quantpipe_serve_queued_images``: gauges.

The access log writes at most ``lines_per_s`` lines per second (a burst of 64 concurrent clients does
not flood it); the lines it skipped are counted in the next one. The bearer token is never logged.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from quantpipe.errors import ConfigError

__all__ = ["ServeMetrics", "AccessLog", "read_token", "token_matches"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("quantpipe_serve_requests", "answered inference requests", ["protocol", "outcome"],
                                registry=r)
        self.failures = Counter("quantpipe_serve_failures", "failed requests by reason", ["protocol", "reason"],
                                registry=r)
        self.latency = Histogram("quantpipe_serve_request_seconds", "request latency, arrival to answer",
                                 ["protocol"], buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("quantpipe_serve_queue_seconds", "time a request waited before its images left",
                                    buckets=_LATENCY, registry=r)
        self.round_trip = Histogram("quantpipe_serve_pipeline_seconds", "microbatch round trip through the stages, "
                                    "from its send to stage 0 to its result", buckets=_LATENCY, registry=r)
        self.batch = Histogram("quantpipe_serve_batch_images", "images per microbatch sent to stage 0",
                               buckets=_BATCH, registry=r)
        self.first_hop_bytes = Counter("quantpipe_serve_first_hop_bytes", "bytes of frames sent to stage 0 "
                                       "(headers included, first transmissions)", registry=r)
        self.images_sent = Counter("quantpipe_serve_images_sent", "images sent to stage 0", registry=r)
        self.in_flight = Gauge("quantpipe_serve_in_flight_requests", "requests accepted and not yet answered",
                               registry=r)
        self.queued = Gauge("quantpipe_serve_queued_images", "images waiting for a microbatch", registry=r)

    def observe_batch(self, images: int, queue_times: list[float], nbytes: int = 0) -> None:
        self.batch.observe(images)
        self.images_sent.inc(images)
        self.first_hop_bytes.inc(nbytes)
        for t in queue_times:
            self.queue_time.observe(t)

    def answered(self, protocol: str, seconds: float, reason: str = "") -> None:
        self.requests.labels(protocol, "error" if reason else "ok").inc()
        if reason:
            self.failures.labels(protocol, reason).inc()
        self.latency.labels(protocol).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class AccessLog:
    """One line per request, at most ``lines_per_s`` per second; the skipped ones are counted."""

    def __init__(self, logger: logging.Logger, lines_per_s: float = 10.0, clock=time.monotonic) -> None:
        self.log = logger
        self.capacity = max(1.0, lines_per_s)
        self.rate = lines_per_s
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()
        self.skipped = 0

    def line(self, peer: str, method: str, path: str, status: int, seconds: float, detail: str = "") -> bool:
        if self.rate <= 0:
            return False
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            self.skipped += 1
            return False
        self.tokens -= 1
        extra = f" (+{self.skipped} lines skipped)" if self.skipped else ""
        self.skipped = 0
        self.log.info("%s %s %s %d %.1f ms%s%s", peer, method, path, status, 1000 * seconds,
                      f" {detail}" if detail else "", extra)
        return True


def read_token(path: str) -> str:
    """The bearer token from ``--token-file`` (one trailing newline stripped; must not be empty)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --token-file {path}: {exc}") from None
    token = text[:-1] if text.endswith("\n") else text
    token = token[:-1] if token.endswith("\r") else token
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"--token-file {path} must hold one token without spaces (e.g. from 'openssl rand -hex 32')")
    return token


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <token>`` (constant-time comparison)."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())
