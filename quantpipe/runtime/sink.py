"""The pipeline's sink: receives the last stage's logits and writes results in order as JSON lines.

One line per image, in image-id order (microbatches may arrive out of order after a resend; the sink
holds them until the gap is filled)::

    {"id": 17, "seq": 2, "top5": [[281, 0.71], [285, 0.12], ...], "latency_ms": 41.3, "t": 1763776000.1}
    {"id": 18, "seq": 2, "error": "engine", "message": "stage 1 engine failed: ..."}

``latency_ms`` is from the moment the source sent the microbatch to the moment the sink received it
(wall clocks of one machine, or NTP-synchronised devices). Scores are softmax probabilities over the
flattened output of each image. The sink exits 0 after ``count`` results (results or errors).

The output file is the record of what was answered: a restarted sink resumes from it (keeps its
lines, cuts a torn last line, skips ids it has) and never truncates it. Only after results are
written and flushed does the sink tell the last stage DONE (see :mod:`quantpipe.runtime.link`), so a
sink killed at any moment loses nothing. A microbatch more than ``64 * credits`` ahead of the next one
expected is refused (counted as ``ahead``), so forged sequence numbers cannot grow its memory.

Run by ``quantpipe run``; by hand: ``python -m quantpipe.runtime.sink --config PIPELINE.toml --count N``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import zmq

from quantpipe import wire
from quantpipe.errors import FrameError, QuantpipeError
from quantpipe.runtime import security
from quantpipe.runtime.config import PipelineConfig, load_config
from quantpipe.runtime.link import LinkOptions, LinkReceiver, Message
from quantpipe.runtime.metrics import DaemonMetrics

__all__ = ["Sink", "top5", "main"]

log = logging.getLogger(__name__)

SINK_STAGE = 0xFFFE


def top5(logits: np.ndarray) -> list[list[list[float]]]:
    """Per image: the five best classes and their softmax probabilities (float64), best first; of equal
    values the lower index first."""
    z = logits.reshape(logits.shape[0], -1)
    k = min(5, z.shape[1])
    best = _top_k(z, k)
    out = []
    for i in range(z.shape[0]):  # row by row: a row's float64 exp stays in cache, a batch's does not
        row = z[i].astype(np.float64)
        e = np.exp(row - row.max())
        denom = e.sum()
        out.append([[int(c), round(float(e[c] / denom), 6)] for c in best[i]])
    return out


def _top_k(z: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values of each row, largest first, ties to the lower index.

    ``k`` passes of a vectorized argmax (first occurrence), each masking what it took: 5 passes over a
    [32, 37824] microbatch (an identity stage's output, which the benchmarks send to the sink) take
    about 0.7 ms, where one argpartition took 15. A row with fewer than ``k`` values above -inf (where a
    pass would take a masked value again) is ordered by a full sort instead."""
    work = np.array(z, dtype=np.result_type(z.dtype, np.float32), copy=True)
    rows = np.arange(z.shape[0])
    picks = np.empty((z.shape[0], k), dtype=np.intp)
    for j in range(k):
        a = work.argmax(axis=1)
        picks[:, j] = a
        work[rows, a] = -np.inf
    s = np.sort(picks, axis=1)
    for i in np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1)):
        picks[i] = np.lexsort((np.arange(z.shape[1]), -z[i].astype(np.float64)))[:k]
    return picks


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
        self.ctx = ctx or security.context(cfg.keys_dir, len(cfg.stages), len(cfg.stages))
        self.link = LinkReceiver(self.ctx, cfg.sink.address, LinkOptions(window=cfg.credits), stage=SINK_STAGE,
                                 on_reject=self.metrics.error)
        self._held: dict[int, list[dict[str, Any]]] = {}  # seq -> results, until the gap before it fills
        #: How far past the next expected seq a microbatch may be and still be held (bounds _held).
        self.max_ahead = 64 * cfg.credits
        self._next_seq = 0
        self._microbatch, self._total = cfg.microbatch, cfg.source.count
        self._resumed_ids: set[int] = set()  # ids of the last, possibly incomplete, microbatch on file
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
            seq = msg.header.seq
            try:  # whatever its seq, only a frame that would be accepted is answered
                self.link.validate(msg)
            except FrameError as exc:
                self.link.reject(msg, exc)
                continue
            if seq < self._next_seq:  # written before a restart: the last stage resent it
                self.link.accept(msg)
                self.link.done(seq)
                continue
            if seq > self._next_seq + self.max_ahead:
                # No real sender can be this far ahead (every link holds at most a few windows), and
                # holding it would let an injector grow our memory without bound: refuse it, unacked.
                self.link.reject(msg, FrameError(f"seq {seq} is more than {self.max_ahead} microbatches ahead of "
                                                 f"the next one expected ({self._next_seq})", "ahead"))
                continue
            results = self._results(msg)
            if results is None:
                continue
            self._held[seq] = results
            released = []
            while self._next_seq in self._held:  # release in order
                for r in self._held.pop(self._next_seq):
                    if r["id"] in self._resumed_ids:
                        continue  # on file already (the microbatch a restart interrupted)
                    self.out.write(json.dumps(r) + "\n")
                    self.written += 1
                    self.errors += "error" in r
                released.append(self._next_seq)
                self._next_seq += 1
            self.out.flush()
            for done in released:  # written: the last stage may forget them
                self.link.done(done)
            self.metrics.images_in.inc(len(results))
        return 0 if self.written >= self.count else 1

    def resume(self, path: str | Path) -> None:
        """Continue an interrupted run from its output file (the record of what was answered).

        Complete lines are kept and counted; a torn last line (killed mid-write) is cut off. Lines are
        written in ``seq`` order, so only the last microbatch on file can be incomplete: it is taken
        again and only its missing ids are written; earlier microbatches resent by the last stage are
        acknowledged and dropped.
        """
        p = Path(path)
        if not p.is_file():
            return
        data = p.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(p, "r+b") as f:
                f.truncate(end)
        last: list[dict[str, Any]] = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                r = json.loads(line)
                seq = int(r["seq"])
                int(r["id"])  # every line must name its image
            except (ValueError, KeyError, TypeError):
                raise QuantpipeError(f"{p} line {n} is not a result line: move the file away to start afresh") from None
            if last and seq != int(last[-1]["seq"]):
                last = []
            last.append(r)
            self.written += 1
            self.errors += "error" in r
        if last:
            seq, first = int(last[0]["seq"]), min(int(r["id"]) for r in last)
            complete = len(last) >= min(self._microbatch, self._total - first)
            self._next_seq = seq + 1 if complete else seq
            self._resumed_ids = set() if complete else {int(r["id"]) for r in last}
        log.info("sink: resuming %s: %d result(s) on file, waiting for microbatch %d", p, self.written, self._next_seq)

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
    sink = Sink(cfg, args.count or cfg.source.count, sys.stdout)
    if cfg.sink.output != "-":
        sink.resume(cfg.sink.output)  # a restarted sink goes on where it stopped; never truncate results
        sink.out = out = open(cfg.sink.output, "a")
    else:
        out = sys.stdout
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
