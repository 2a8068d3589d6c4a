"""Prometheus metrics of one daemon (prometheus_client), served on its own port.

Every metric carries a ``stage`` label (``source``, ``0``, ``1``, ..., ``sink``) so that one Prometheus
can scrape all daemons of a pipeline and aggregate. Each daemon uses its own registry, so several
daemons can live in one test process without clashing.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["DaemonMetrics"]

log = logging.getLogger(__name__)

# Microbatch latencies on edge devices range from sub-millisecond (identity) to seconds (ViT-B on CPU).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DaemonMetrics:
    """The metrics a stage (or the source/sink) exports.

    Args:
        stage: label value (``"0"``, ``"source"``, ``"sink"``).
        port: TCP port of the ``/metrics`` endpoint (started by :meth:`serve`); 0: never served.
        addr: interface to serve on (all interfaces by default: devices are scraped over the network).
    """

    def __init__(self, stage: str, port: int = 0, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        r, lb = self.registry, ["stage"]
        self.images_in = Counter("quantpipe_images_received", "images accepted from upstream", lb, registry=r).labels(stage)
        self.images_out = Counter("quantpipe_images_sent", "images sent downstream (first transmissions)", lb,
                                  registry=r).labels(stage)
        self.bytes_out = Counter("quantpipe_bytes_sent", "bytes of frames sent downstream, headers included", lb,
                                 registry=r).labels(stage)
        self.bits = Gauge("quantpipe_bitwidth", "bitwidth of the frames now being sent", lb, registry=r).labels(stage)
        self.bandwidth = Gauge("quantpipe_bandwidth_bytes_per_second",
                               "downstream link bandwidth measured from acknowledged bytes over busy time",
                               lb, registry=r).labels(stage)
        self.queue_depth = Gauge("quantpipe_queue_depth", "microbatches sent downstream and not yet acknowledged",
                                 lb, registry=r).labels(stage)
        self.stage_seconds = Histogram("quantpipe_stage_seconds", "engine run time per microbatch", lb,
                                       buckets=_LATENCY_BUCKETS, registry=r).labels(stage)
        codec = Histogram("quantpipe_codec_seconds", "frame encode/decode time per microbatch", ["stage", "op"],
                          buckets=_LATENCY_BUCKETS, registry=r)
        self.encode_seconds = codec.labels(stage, "encode")
        self.decode_seconds = codec.labels(stage, "decode")
        # CPU seconds of this process's threads per part of the data path (time.thread_time): where a
        # hop's time goes, summed; 'quantpipe bench pipeline' divides by microbatches.
        cpu = Counter("quantpipe_datapath_cpu_seconds", "CPU time of the data path by part "
                      "(validate, decode, engine, encode, send)", ["stage", "part"], registry=r)
        self.microbatches = Counter("quantpipe_microbatches_processed", "microbatches decoded, run and sent on",
                                    lb, registry=r).labels(stage)
        self.cpu = {part: cpu.labels(stage, part) for part in ("validate", "decode", "engine", "encode", "send")}
        self._errors = Counter("quantpipe_errors", "messages or microbatches rejected, by kind", ["stage", "kind"],
                               registry=r)
        self._stage = stage
        self.resends = Counter("quantpipe_resends", "microbatches sent again (timeout or downstream restart)", lb,
                               registry=r).labels(stage)
        self.duplicates = Counter("quantpipe_duplicates", "duplicate microbatches dropped by sequence number", lb,
                                  registry=r).labels(stage)
        self.peer_up = Gauge("quantpipe_peer_up", "1 while the peer of a link is heard from", ["stage", "link"],
                             registry=r)
        self.port = port
        self.addr = addr

    def serve(self) -> None:
        """Start the ``/metrics`` endpoint (when a port was given). A daemon calls this once it is ready,
        so that a scrape that answers means a daemon that serves."""
        if self.port:
            start_http_server(self.port, addr=self.addr, registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", self.addr, self.port)

    def error(self, kind: str) -> None:
        """Count one rejected message or failed microbatch under ``kind`` (a FrameError kind or similar)."""
        self._errors.labels(self._stage, kind).inc()

    def error_count(self, kind: str) -> float:
        """Current count of ``kind`` (tests and the summary)."""
        value = self.registry.get_sample_value("quantpipe_errors_total", {"stage": self._stage, "kind": kind})
        return value or 0.0
