"""``quantpipe calibrate``: clip tables for every bitwidth at every boundary of a stage export.

One streaming pass: images are decoded and preprocessed in batches, run through the stage engines in
fp32 (the last stage is never needed), and every boundary tensor updates a
:class:`~quantpipe.quant.observer.BoundaryObserver`, whose memory does not depend on the number of
images. The clip range of every method at every bitwidth then comes from those statistics, and the
result is written as a :class:`~quantpipe.quant.table.ClipTable`.

Methods are those of :mod:`quantpipe.quant.clipping` (``naive``, ``aciq``, ``aciq_gauss``, ``ds_aciq``
per tensor, as in the paper; ``naive_pc``, ``aciq_pc``, ``ds_aciq_pc``, ``mse_pc`` per channel) plus
rotated variants ``rot_<method>``: the boundary tensor is multiplied by a randomized Hadamard matrix
``R`` (orthogonal, so ``R.T`` undoes it exactly) before quantization. ``R`` spreads the few very large
channels of a ViT's residual stream over all channels, so the per-channel ranges no longer have to
cover outliers and 2-4 bit steps shrink; the table stores ``R`` and the stages apply it in the codec
path (see :func:`quantpipe.wire.encode_frame`). The observer of a rotated method sees ``x @ R``.

Example (the split used in BENCHMARKS.md; images 0-1 of every class calibrate, 2-4 evaluate)::

    quantpipe calibrate --stages stages/ --dataset imagenet --data-dir ../shared/data/imagenet-dev \\
        --per-class 2 --out stages/clip_table.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe import __version__
from quantpipe.calib.chain import StageChain, add_engine_arguments
from quantpipe.calib.data import DATASETS, Dataset, iter_batches, open_dataset
from quantpipe.errors import ConfigError, QuantpipeError
from quantpipe.quant.table import ClipTable

__all__ = ["DEFAULT_BITS", "DEFAULT_METHODS", "MethodPlan", "resolve_methods", "calibrate", "add_arguments", "run",
           "add_dataset_arguments", "dataset_from_args", "parse_int_list"]

log = logging.getLogger(__name__)

DEFAULT_BITS = (2, 3, 4, 5, 6, 8, 16)
#: the paper's per-tensor methods, the per-channel ones, and the rotated per-channel methods (ours)
DEFAULT_METHODS = ("naive", "aciq", "ds_aciq", "naive_pc", "aciq_pc", "ds_aciq_pc", "mse_pc", "rot_aciq_pc",
                   "rot_mse_pc")
ROTATION_PREFIX = "rot_"


@dataclass(frozen=True)
class MethodPlan:
    """How to compute one table method: a clipping method, optionally after a rotation."""

    name: str
    base: str
    granularity: str  # "tensor" | "channel"
    rotation: str | None  # rotation kind, e.g. "hadamard"

    def record(self, seed: int) -> dict[str, Any]:
        """The method's entry in the clip table."""
        transform = None if self.rotation is None else {"key": rotation_key(self.rotation, seed), "kind": self.rotation,
                                                        "seed": seed}
        desc = f"{self.base} clip ranges" + ("" if self.rotation is None else f" of x @ R ({self.rotation} rotation)")
        return {"name": self.name, "granularity": self.granularity, "transform": transform, "description": desc}


def rotation_key(kind: str, seed: int) -> str:
    """Name under which a boundary's rotation matrix is stored in the table (shared by its methods)."""
    return f"{kind}-{seed}"


def resolve_methods(names: list[str]) -> list[MethodPlan]:
    """Validate method names (clipping methods, or ``rot_`` + a clipping method)."""
    from quantpipe.quant.clipping import METHODS, PER_CHANNEL_METHODS

    plans = []
    for name in names:
        base, rotation = (name[len(ROTATION_PREFIX):], "hadamard") if name.startswith(ROTATION_PREFIX) else (name, None)
        if base not in METHODS:
            choices = ", ".join(list(METHODS) + [ROTATION_PREFIX + m for m in METHODS if m in PER_CHANNEL_METHODS])
            raise ConfigError(f"unknown method {name!r}: choose from {choices}")
        plans.append(MethodPlan(name, base, "channel" if base in PER_CHANNEL_METHODS else "tensor", rotation))
    if len({p.name for p in plans}) != len(plans):
        raise ConfigError(f"--methods lists a method twice: {','.join(names)}")
    return plans


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def _progress(total: int, desc: str, logger: logging.Logger = log):
    """A tqdm bar on a terminal; plain periodic log lines otherwise (CI logs, pipes)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit="img")

    class _Log:
        def __init__(self) -> None:
            self.n, self.t0, self.last = 0, time.monotonic(), 0.0

        def update(self, k: int) -> None:
            self.n += k
            now = time.monotonic()
            if now - self.last > 10 or self.n >= total:
                self.last = now
                logger.info("%s: %d/%d images (%.1f img/s)", desc, self.n, total, self.n / max(now - self.t0, 1e-9))

        def close(self) -> None:
            pass

    return _Log()


def calibrate(
    chain: StageChain,
    dataset: Dataset,
    methods: list[MethodPlan],
    bits: list[int],
    *,
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 2,
    provenance: dict[str, Any] | None = None,
) -> ClipTable:
    """Observe every boundary over ``dataset`` and build the clip table (library entry point)."""
    from quantpipe.quant.observer import BoundaryObserver
    from quantpipe.quant.primitives import QUANT_BITS
    from quantpipe.quant.rotation import orthogonal_matrix

    bad = [b for b in bits if b not in QUANT_BITS]
    if bad:
        raise ConfigError(f"--bits {bad} cannot be calibrated; choose from {', '.join(map(str, QUANT_BITS))}")
    rotations = sorted({p.rotation for p in methods if p.rotation})
    nb = chain.num_boundaries
    channels = [chain.boundary_channels(b) for b in range(nb)]
    # one observer per boundary and per distinct input transform (identity or a rotation kind)
    mats = {(b, kind): np.ascontiguousarray(orthogonal_matrix(channels[b], seed=seed, kind=kind), dtype=np.float32)
            for b in range(nb) for kind in rotations}
    observers = {(b, kind): BoundaryObserver(channels[b]) for b in range(nb) for kind in [None, *rotations]}
    bar = _progress(len(dataset), "calibrate")
    seen = 0
    try:
        for batch in iter_batches(dataset, chain.preprocess, batch_size, workers=workers):
            x = batch.images
            for b in range(nb):
                x = chain.run_stage(b, x)
                observers[(b, None)].update(x)
                for kind in rotations:
                    # a 2-D matmul is one BLAS call; numpy's stacked 3-D matmul is several times slower
                    flat = x.reshape(-1, channels[b])
                    observers[(b, kind)].update(flat @ mats[(b, kind)])
            seen += len(batch.ids)
            bar.update(len(batch.ids))
    finally:
        bar.close()
    if seen == 0:
        raise QuantpipeError(f"no image of the {len(dataset)} selected could be read; nothing to calibrate on")
    log.info("observed %d images (%d skipped)", seen, len(dataset.skipped))
    entries = []
    for b in range(nb):
        ranges = {p.name: {k: observers[(b, p.rotation)].ranges(p.base, k) for k in bits} for p in methods}
        transforms = {rotation_key(kind, seed): mats[(b, kind)] for kind in rotations}
        entries.append({"index": b, "shape": list(chain.manifest.boundaries[b].shape), "channels": channels[b],
                        "ranges": ranges, "transforms": transforms})
    prov = dict(provenance or {})
    prov.update(
        model=chain.manifest.model,
        split=list(chain.manifest.split),
        stages=[{"index": s.index, "file": s.file, "sha256": s.sha256} for s in chain.manifest.stages],
        dataset=dict(dataset.description, skipped=len(dataset.skipped)),
        num_images=seen,
        methods=[p.name for p in methods],
        rotation_seed=seed,
        engine=chain.engines[0].describe(),
        tool={"quantpipe": __version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return ClipTable.build(methods=[p.record(seed) for p in methods], bits=bits, boundaries=entries, provenance=prov)


# ---------------------------------------------------------------------------------------------- CLI
def add_dataset_arguments(parser: argparse.ArgumentParser, *, default_offset: int = 0) -> None:
    """Dataset flags shared by ``calibrate`` and ``evaluate``."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, required=True,
                       help="imagenet (ImageFolder of wnid folders, or flat ILSVRC val + ground truth), "
                            "folder (unlabelled images), synthetic (tests)")
    group.add_argument("--data-dir", help="image directory (not for synthetic)")
    group.add_argument("--ground-truth", help="labels of a flat ILSVRC validation folder "
                                              "(LOC_val_solution.csv or '<file> <wnid|index>' lines)")
    group.add_argument("--offset", type=int, default=default_offset,
                       help=f"skip the first OFFSET images of every class (default: {default_offset})")
    group.add_argument("--per-class", type=int, help="take at most this many images per class after the offset")
    group.add_argument("--num-images", type=int, help="take at most this many images in all (classes balanced)")


def dataset_from_args(args: argparse.Namespace) -> Dataset:
    return open_dataset(args.dataset, args.data_dir, offset=args.offset, per_class=args.per_class,
                        num_images=args.num_images, ground_truth=args.ground_truth)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", required=True, help="export directory (quantpipe export --out)")
    parser.add_argument("--out", required=True, help="clip table to write (JSON)")
    add_dataset_arguments(parser)
    parser.add_argument("--bits", default=",".join(map(str, DEFAULT_BITS)),
                        help=f"bitwidths to calibrate (default: {','.join(map(str, DEFAULT_BITS))})")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"clip methods (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rotation of rot_* methods (default: 0)")
    add_engine_arguments(parser)


def _command_line(args: argparse.Namespace) -> str:
    """The command that regenerates this table, recorded in its provenance and in mismatch errors."""
    parts = ["quantpipe", "calibrate", "--stages", args.stages, "--dataset", args.dataset]
    for flag in ("data_dir", "ground_truth", "offset", "per_class", "num_images", "bits", "methods", "seed"):
        value = getattr(args, flag)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    return shlex.join(parts + ["--out", args.out])


def run(args: argparse.Namespace) -> int:
    # Refuse an unusable --out now, not after the whole calibration pass.
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a directory; give the table's file name, e.g. {Path(args.out) / 'clip_table.json'}")
    bits = sorted(set(parse_int_list(args.bits, "--bits")))
    methods = resolve_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    dataset = dataset_from_args(args)
    log.info("calibrating on %d images of %s", len(dataset), dataset.root)
    with StageChain(args.stages, backend=args.engine, threads=args.threads) as chain:
        t0 = time.monotonic()
        table = calibrate(chain, dataset, methods, bits, seed=args.seed, batch_size=args.batch_size,
                          workers=args.workers, provenance={"command": _command_line(args)})
    path = table.save(args.out)
    print(f"wrote {path}: {len(table.methods)} methods x {len(table.bits)} bitwidths x {len(table.boundaries)} "
          f"boundaries from {table.provenance['num_images']} images in {time.monotonic() - t0:.1f} s "
          f"(digest {table.digest:08x}, {len(dataset.skipped)} files skipped)")
    return 0
