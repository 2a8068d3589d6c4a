"""The pipeline's source: reads images, batches them into numbered microbatches, feeds stage 0.

Microbatch ``seq`` (0, 1, 2, ...) carries images ``first_id .. first_id + B - 1``; both numbers travel
unchanged through every stage to the sink. The source offers at most ``rate`` images/s (default: the target
rate) and never has more than ``credits`` microbatches unacknowledged, so a slow pipeline slows the
source instead of filling memory. Stage 0's input is float32 and unquantized (only boundaries between
stages are quantized).

Input, in order of preference:

* ``--images DIR``: an ImageFolder (``<wnid>/*.jpg``, labelled; ``source.offset`` skips the first
  images of every class, e.g. those the clip table was calibrated on) or any folder of images,
  preprocessed exactly like timm's eval transform for the exported model (:mod:`quantpipe.calib.data`,
  needs PIL).
* an exported model without images: quantpipe's synthetic, image-like pictures, same preprocessing.
* builtin engines: deterministic random tensors of ``pipeline.input_shape`` (a pool of 16, cycled).

Images are cycled when ``count`` exceeds what the folder holds. One JSON line per image
(``{"id", "label", "path"}``) goes to ``--labels`` so that results can be scored.

**Restart.** With ``--progress FILE`` the source records, atomically, the highest ``seq`` up to
which every microbatch was handed on by stage 0 (DONE: stage 1 holds it, so it survives the source).
Restarted with ``--resume``, it starts right after that seq instead of replaying the stream from the
start (stage 0 drops by ``seq`` the few it already took); without the file it starts at 0. The file
names the stream's ``count`` and ``microbatch``; a file from another stream is refused.

Run by ``quantpipe run``; by hand: ``python -m quantpipe.runtime.source --config PIPELINE.toml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zmq

from quantpipe import wire
from quantpipe.errors import QuantpipeError
from quantpipe.runtime import security
from quantpipe.runtime.config import PipelineConfig, load_config
from quantpipe.runtime.link import LinkOptions, LinkSender

__all__ = ["Source", "load_inputs", "main"]

log = logging.getLogger(__name__)

_POOL = 16
_MAX_PRELOADED = 512  # decoded 3x224x224 images: 600 KB each


@dataclass
class Inputs:
    """Decoded, preprocessed inputs that the source cycles through."""

    images: np.ndarray  # float32 [N, ...] (per-image input of stage 0)
    labels: list[int]
    paths: list[str]


def load_inputs(cfg: PipelineConfig, images: str = "") -> Inputs:
    """Load what stage 0 consumes (see the module docstring for the order of preference)."""
    images = images or cfg.source.images
    if not images and not cfg.stages_dir:
        shape = tuple(cfg.input_shape)
        rng = np.random.default_rng(1234)
        pool = rng.standard_normal((min(_POOL, cfg.source.count), *shape)).astype(np.float32)
        return Inputs(pool, [-1] * len(pool), [f"random:{i}" for i in range(len(pool))])
    from quantpipe.calib.data import Preprocess, iter_batches, open_dataset

    data_config: dict[str, Any] = {}
    if cfg.stages_dir:
        from quantpipe.manifest import load_manifest

        manifest = load_manifest(cfg.stages_dir, verify=False)
        data_config = manifest.data_config
        pixels = manifest.pixels_stage0
        if pixels and Path(cfg.stages[0].engine).resolve() == (Path(cfg.stages_dir) / str(pixels["file"])).resolve():
            raise QuantpipeError(
                f"stage 0's engine {cfg.stages[0].engine} takes uint8 pixel values (export --pixels-stage), but the "
                "source streams normalized float32 images: set stage 0's engine to the export's stage0.onnx for "
                "'quantpipe run', or serve the pixel graph with 'quantpipe serve'")
    n = min(cfg.source.count, _MAX_PRELOADED)
    if images:
        try:
            dataset = open_dataset("imagenet", images, offset=cfg.source.offset, num_images=n)
        except QuantpipeError:
            dataset = open_dataset("folder", images, num_images=n)  # unlabelled: no classes to offset
    else:
        dataset = open_dataset("synthetic", num_images=min(n, 64))
    batches = list(iter_batches(dataset, Preprocess.from_config(data_config), batch_size=32, workers=2))
    if not batches:
        raise QuantpipeError(f"no readable images in {images or 'the synthetic set'}")
    ids = np.concatenate([b.ids for b in batches])
    return Inputs(np.concatenate([b.images for b in batches]), [int(v) for v in np.concatenate([b.labels for b in batches])],
                  [dataset.samples[i].path for i in ids])


class Source:
    """Streams ``count`` images to stage 0 in microbatches, paced and credit-limited.

    Args:
        cfg: the pipeline config (stage 0's address, microbatch, credits, count, rate).
        inputs: what to send (from :func:`load_inputs`).
        labels: optional JSON-lines file for ``{"id", "label", "path"}`` per image.
        progress: optional file that records the last microbatch handed on (see the module docstring).
        resume: start after the microbatch recorded in ``progress`` (from 0 if the file does not exist).
        ctx: ZeroMQ context.
    """

    def __init__(self, cfg: PipelineConfig, inputs: Inputs, *, labels: str = "", progress: str = "",
                 resume: bool = False, ctx: zmq.Context | None = None) -> None:
        if resume and not progress:
            raise QuantpipeError("--resume needs --progress FILE (where the previous run recorded its progress)")
        self.cfg = cfg
        self.inputs = inputs
        self.labels = labels
        self.progress = Path(progress) if progress else None
        #: First seq to send: 0, or one past the recorded progress with ``resume``.
        self.start_seq = self._read_progress() + 1 if resume else 0
        self._done_below = self.start_seq  # every seq below this one was handed on
        self._done_above: set[int] = set()  # handed on out of order, above the watermark
        self._recorded = self.start_seq - 1
        self._recorded_at = 0.0
        self.ctx = ctx or security.context(cfg.keys_dir, -1, len(cfg.stages))
        self.link = LinkSender(self.ctx, cfg.stages[0].address, LinkOptions(window=cfg.credits),
                               stage=wire.SOURCE_STAGE, policy_window=cfg.window)
        self.link.on_done = self._handed_on
        self.stopping = False

    # -- progress (restart without replaying) ---------------------------------------------------
    def _stream(self) -> dict[str, int]:
        return {"count": self.cfg.source.count, "microbatch": self.cfg.microbatch}

    def _read_progress(self) -> int:
        """The recorded last handed-on seq, or -1 (nothing recorded yet)."""
        assert self.progress is not None
        if not self.progress.is_file():
            return -1
        try:
            doc = json.loads(self.progress.read_text())
            done = int(doc["done_through"])
            stream = {k: int(doc[k]) for k in self._stream()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QuantpipeError(f"cannot read source progress {self.progress} ({exc}): remove it to start "
                                 "the stream from the beginning") from None
        if stream != self._stream():
            raise QuantpipeError(f"{self.progress} records a stream of {stream}, this config streams "
                                 f"{self._stream()}: remove it to start afresh")
        return done

    def _handed_on(self, seq: int) -> None:
        """Stage 0 sent DONE for ``seq``: advance the contiguous watermark; record it now and then."""
        self._done_above.add(seq)
        while self._done_below in self._done_above:
            self._done_above.discard(self._done_below)
            self._done_below += 1
        if time.monotonic() - self._recorded_at >= 0.1:  # at most 10 writes/s: a restart replays < 0.1 s
            self.record_progress()

    def record_progress(self) -> None:
        """Write the watermark atomically (a crash mid-write leaves the previous record intact)."""
        done = self._done_below - 1
        if self.progress is None or done == self._recorded:
            return
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        tmp.write_text(json.dumps({"done_through": done, **self._stream()}))
        os.replace(tmp, self.progress)
        self._recorded, self._recorded_at = done, time.monotonic()

    def microbatches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(seq, first_id, images) from :attr:`start_seq` to the end of the stream, cycling the inputs."""
        n, mb = len(self.inputs.images), self.cfg.microbatch
        for seq, first in enumerate(range(0, self.cfg.source.count, mb)):
            if seq < self.start_seq:
                continue
            ids = np.arange(first, min(first + mb, self.cfg.source.count)) % n
            yield seq, first, np.ascontiguousarray(self.inputs.images[ids])

    def write_labels(self) -> None:
        if not self.labels:
            return
        n = len(self.inputs.images)
        with open(self.labels, "w") as f:
            for i in range(self.cfg.source.count):
                f.write(json.dumps({"id": i, "label": self.inputs.labels[i % n], "path": self.inputs.paths[i % n]}) + "\n")

    def serve(self, drain_timeout_s: float = 60.0, started: str = "") -> int:
        """Send everything, then wait until stage 0 acknowledged it. Returns the exit code.

        ``started``: a file that receives ``{"t": wall-clock time}`` just before the first microbatch
        leaves (the launcher's t = 0 for schedules and the timeline).
        """
        self.write_labels()
        if self.start_seq:
            log.info("resuming after microbatch %d (recorded in %s)", self.start_seq - 1, self.progress)
        period = self.cfg.microbatch / self.cfg.source_rate
        start = t0 = time.monotonic()
        if started:
            tmp = Path(started + ".tmp")
            tmp.write_text(json.dumps({"t": time.time()}))
            os.replace(tmp, started)  # atomic: the launcher never reads half a file
        sent = 0
        for seq, first, x in self.microbatches():
            # Pace to the offered rate; keep the link serviced (acks, heartbeats) while waiting.
            due = start + (seq - self.start_seq) * period
            if time.monotonic() - due > 2 * period:
                # Behind (the pipeline stalled): a live source, like a camera, does not replay at line
                # rate the images it could not deliver in time; restart the clock instead of bursting,
                # so the offered load never exceeds the rate.
                start += time.monotonic() - due
                due = start + (seq - self.start_seq) * period
            while not self.stopping and time.monotonic() < due:
                self.link.pump(min(0.01, max(0.0, due - time.monotonic())))
            if self.stopping or not self.link.wait_credit(should_stop=lambda: self.stopping):
                break
            frames = wire.encode_frame(x, seq=seq, first_id=first, stage=wire.SOURCE_STAGE, bits=32)
            self.link.send(frames + [wire.pack_trace(time.time())], seq=seq, images=len(x), bits=32,
                           fp32_bytes=x.nbytes)
            sent += len(x)
            self.link.pump(0.0)
        drained = self.link.drain(drain_timeout_s)
        self.record_progress()
        log.info("source: sent %d image(s) in %.1f s; %s", sent, time.monotonic() - t0,
                 "all acknowledged" if drained else f"{self.link.in_flight} microbatch(es) unacknowledged")
        self.link.close()
        return 0 if drained else 1

    def stop(self, *_: Any) -> None:
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantpipe.runtime.source", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", default="", help="image folder (overrides source.images)")
    parser.add_argument("--count", type=int, help="images to stream (overrides source.count)")
    parser.add_argument("--rate", type=float, help="images/s offered (overrides source.rate)")
    parser.add_argument("--labels", default="", help="write {id, label, path} JSON lines here")
    parser.add_argument("--started", default="", help="write {\"t\": time} here just before the first send")
    parser.add_argument("--progress", default="", help="record the last microbatch handed on by stage 0 here")
    parser.add_argument("--resume", action="store_true",
                        help="start after the microbatch recorded in --progress (from the start if it does not exist)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s source: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, {"source.count": args.count, "source.rate": args.rate})
        source = Source(cfg, load_inputs(cfg, args.images), labels=args.labels, progress=args.progress,
                        resume=args.resume)
    except QuantpipeError as exc:
        print(f"source: error: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, source.stop)
    signal.signal(signal.SIGINT, source.stop)
    return source.serve(started=args.started)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
