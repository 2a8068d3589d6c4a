"""The pipeline's sink: receives the last stage's logits and writes results in order as JSON lines.

One line per image, in image-id order (microbatches may arrive out of order after a resend; the sink
holds them until the gap is filled)::

    {"id": 17, "seq": 2, "top5": [[281, 0.71], [285, 0.12], ...], "latency_ms": 41.3, "t": 1763776000.1}
    {"id": 18, "seq": 2, "error": "engine", "message": "stage 1 engine failed: ..."}

``latency_ms`` is from the moment the source sent the microbatch to the moment the sink received it
(wall clocks of one machine, or NTP-synchronised devices). Scores are softmax probabilities over the
flattened output of each image. The sink exits 0 after ``count`` results (results or errors).

Run by ``quantpipe run``; by hand: ``python -m quantpipe.runtime.sink --config PIPELINE.toml --count N``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import IO, Any

import numpy as np
import zmq

from quantpipe import wire
from quantpipe.errors import FrameError, QuantpipeError
from quantpipe.runtime.config import PipelineConfig, load_config
from quantpipe.runtime.link import LinkOptions, LinkReceiver, Message
from quantpipe.runtime.metrics import DaemonMetrics

__all__ = ["Sink", "top5", "main"]

log = logging.getLogger(__name__)

SINK_STAGE = 0xFFFE


def top5(logits: np.ndarray) -> list[list[list[float]]]:
    """Per image: the five best classes and their softmax probabilities, best first."""
    z = logits.reshape(logits.shape[0], -1)
    k = min(5, z.shape[1])
    top = np.argpartition(-z, k - 1, axis=1)[:, :k]  # O(n), not a full sort of every class
    out = []
    for i in range(z.shape[0]):
        row = z[i].astype(np.float64)
        m = row.max()
        denom = np.exp(row - m).sum()
        best = sorted(top[i], key=lambda c: (-row[c], c))
        out.append([[int(c), round(float(np.exp(row[c] - m) / denom), 6)] for c in best])
    return out


class Sink:
    """Receives results, reorders them by sequence number and writes JSON lines.

    Args:
        cfg: the pipeline config (sink address, credits).
        count: results to wait for before returning.
        out: where to write the JSON lines.
        keep_logits: also keep every image's raw output in :attr:`logits` (tests, exactness checks).
        ctx: ZeroMQ context.
    """

    def __init__(self, cfg: PipelineConfig, count: int, out: IO[str], *, keep_logits: bool = False,
                 ctx: zmq.Context | None = None) -> None:
        self.count = count
        self.out = out
        self.keep_logits = keep_logits
        self.logits: dict[int, np.ndarray] = {}
        self.metrics = DaemonMetrics("sink")
        self.ctx = ctx or zmq.Context()
        self.link = LinkReceiver(self.ctx, cfg.sink.address, LinkOptions(window=cfg.credits), stage=SINK_STAGE,
                                 on_reject=self.metrics.error)
        self._held: dict[int, list[dict[str, Any]]] = {}
        self._next_seq = 0
        self.written = 0
        self.errors = 0
        self.stopping = False

    def _results(self, msg: Message) -> list[dict[str, Any]] | None:
        h, now = msg.header, time.time()
        if h.msg_type == wire.MsgType.ERROR:
            self.link.accept(msg)
            try:
                report = json.loads(msg.body.decode())
            except (UnicodeDecodeError, ValueError):
                report = {"kind": "unknown", "message": "unreadable error report"}
            return [{"id": h.first_id + i, "seq": h.seq, "error": str(report.get("kind", "unknown")),
                     "message": str(report.get("message", ""))} for i in range(h.batch)]
        try:
            header, y = wire.decode_frame(msg.frames, max_payload=self.link.options.max_message_bytes)
        except FrameError as exc:
            self.link.reject(msg, exc)
            return None
        self.link.accept(msg)
        latency = round(1000 * (now - msg.t_origin), 3)
        if self.keep_logits:
            for i in range(header.batch):
                self.logits[header.first_id + i] = np.array(y[i])
        return [{"id": header.first_id + i, "seq": header.seq, "top5": t, "latency_ms": latency, "t": round(now, 6)}
                for i, t in enumerate(top5(y))]

    def serve(self, timeout_s: float = float("inf")) -> int:
        """Write results until ``count`` are out (0), or ``timeout_s`` of silence / a stop (1)."""
        last = time.monotonic()
        while self.written < self.count and not self.stopping:
            msg = self.link.receive(timeout_s=0.1)
            if msg is None:
                if time.monotonic() - last > timeout_s:
                    log.error("sink: no result for %.0f s; %d of %d written", timeout_s, self.written, self.count)
                    return 1
                continue
            last = time.monotonic()
            results = self._results(msg)
            if results is None:
                continue
            self._held[msg.header.seq] = results
            while self._next_seq in self._held:  # release in order
                for r in self._held.pop(self._next_seq):
                    self.out.write(json.dumps(r) + "\n")
                    self.written += 1
                    self.errors += "error" in r
                self._next_seq += 1
            self.out.flush()
            self.metrics.images_in.inc(len(results))
        return 0 if self.written >= self.count else 1

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def close(self, linger_s: float = 1.0) -> None:
        self.link.close(linger_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantpipe.runtime.sink", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--count", type=int, help="results to wait for (default source.count)")
    parser.add_argument("--output", help="JSON-lines file, '-' for stdout (overrides sink.output)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds without a result")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s sink: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, {"sink.output": args.output})
    except QuantpipeError as exc:
        print(f"sink: error: {exc}", file=sys.stderr)
        return 1
    out = sys.stdout if cfg.sink.output == "-" else open(cfg.sink.output, "w")
    sink = Sink(cfg, args.count or cfg.source.count, out)
    signal.signal(signal.SIGTERM, sink.stop)
    signal.signal(signal.SIGINT, sink.stop)
    try:
        return sink.serve(args.timeout)
    finally:
        sink.close()
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
