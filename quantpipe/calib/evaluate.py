"""``quantpipe evaluate``: accuracy of the quantized pipeline for every method and bitwidth.

The stage chain runs with every boundary quantized exactly as the stage daemons do it: one wire frame
per crossing, encoded and decoded with the clip table (:func:`quantpipe.calib.chain.quantize_boundary`),
so rotations, ranges and the codec are the deployed ones. For each method x bitwidth it reports top-1,
top-5 and top-1 agreement with the unquantized pipeline, as a table shaped like the paper's Table 1,
and the quantization MSE of every method at every boundary on the unquantized boundary tensors (so that
DS-ACIQ's claimed MSE advantage over ACIQ is measured).

Efficiency: images are decoded once; stage 0 and the fp32 chain run once per batch; only the stages
after a quantized boundary run again for each method x bitwidth.

The evaluation images must not be calibration images: the table records how its images were selected,
and evaluate refuses a selection that overlaps it (``--allow-overlap`` to override).

Example (after the calibrate example; images 2-4 of every class)::

    quantpipe evaluate --stages stages/ --table stages/clip_table.json --dataset imagenet \\
        --data-dir ../shared/data/imagenet-dev --offset 2 --out results/
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from quantpipe.calib.calibrate import _progress, add_dataset_arguments, dataset_from_args, parse_int_list
from quantpipe.calib.chain import StageChain, add_engine_arguments, quantize_boundary
from quantpipe.calib.data import Dataset, open_dataset
from quantpipe.calib.report import AccuracyRow, EvalResult, MseRow, markdown_report, write_reports
from quantpipe.errors import ConfigError, QuantpipeError
from quantpipe.quant.primitives import WIRE_BITS
from quantpipe.quant.table import ClipTable

__all__ = ["DEFAULT_EVAL_BITS", "evaluate", "check_disjoint", "add_arguments", "run"]

log = logging.getLogger(__name__)

DEFAULT_EVAL_BITS = (32, 16, 8, 6, 4, 3, 2)


class _Counts:
    """Running top-1 / top-5 / agreement counts of one configuration."""

    def __init__(self) -> None:
        self.top1 = self.top5 = self.agree = self.n = 0

    def add(self, logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> None:
        pred = logits.argmax(axis=1)
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        self.top1 += int((pred == labels).sum())
        self.top5 += int((top5 == labels[:, None]).any(axis=1).sum())
        self.agree += int((pred == reference).sum())
        self.n += len(labels)


def check_disjoint(table: ClipTable, dataset: Dataset) -> int:
    """Number of evaluation images that the table was calibrated on (0 = disjoint, -1 = unknown).

    The calibration selection is rebuilt from the table's provenance (dataset kind, folder and
    selection options); when its folder is not this one, the two cannot share images. When it cannot
    be rebuilt (the folder moved, a ground-truth file is gone) the answer is -1: not provably disjoint.
    """
    cal = table.provenance.get("dataset") or {}
    if cal.get("kind") != dataset.kind:
        return 0
    if cal.get("kind") != "synthetic" and cal.get("data_dir") != dataset.description.get("data_dir"):
        return 0
    try:
        calib = open_dataset(cal["kind"], cal.get("data_dir"), offset=int(cal.get("offset") or 0),
                             per_class=cal.get("per_class"), num_images=cal.get("num_images"),
                             ground_truth=cal.get("ground_truth"))
    except QuantpipeError as exc:
        log.warning("cannot rebuild the calibration selection to check for overlap: %s", exc)
        return -1
    return len({s.path for s in calib.samples} & {s.path for s in dataset.samples})


def evaluate(
    chain: StageChain,
    table: ClipTable,
    dataset: Dataset,
    methods: list[str],
    bits: list[int],
    *,
    batch_size: int = 32,
    workers: int = 2,
) -> EvalResult:
    """Run the chain on ``dataset`` for every method x bitwidth (library entry point)."""
    from quantpipe.calib.data import iter_batches

    midx = {m: table.method_index(m) for m in methods}
    qbits = [b for b in bits if b != 32]
    missing = sorted(set(qbits) - set(table.bits))
    if missing:
        raise ConfigError(f"the clip table has no ranges for {missing} bits (it has {list(table.bits)}); "
                          "re-run quantpipe calibrate with --bits including them")
    nb = chain.num_boundaries
    if list(table.boundaries) != list(range(nb)):
        raise QuantpipeError(f"the clip table covers boundaries {list(table.boundaries)}, the stages have {nb}")
    fp = _Counts()
    counts = {(m, k): _Counts() for m in methods for k in qbits}
    sse = {(b, m, k): 0.0 for b in range(nb) for m in methods for k in qbits}
    sumsq = [0.0] * nb
    labelled = dataset.labelled
    bar = _progress(len(dataset), "evaluate", log)
    try:
        for batch in iter_batches(dataset, chain.preprocess, batch_size, workers=workers):
            labels = batch.labels
            clean = [chain.run_stage(0, batch.images)]  # fp32 boundary tensors, computed once per batch
            for s in range(1, nb):
                clean.append(chain.run_stage(s, clean[-1]))
            ref_logits = chain.run_stage(nb, clean[-1])
            reference = ref_logits.argmax(axis=1)
            fp.add(ref_logits, labels, reference)
            for b in range(nb):
                sumsq[b] += float(np.square(clean[b], dtype=np.float64).sum())
            for m in methods:
                for k in qbits:
                    x = None
                    for b in range(nb):
                        qclean = quantize_boundary(clean[b], table=table, boundary=b, method=midx[m], bits=k)
                        sse[(b, m, k)] += float(np.square(qclean.astype(np.float64) - clean[b]).sum())
                        # boundary 0 sees the clean tensor; later boundaries see what the chain made of
                        # the already-quantized earlier boundaries, as in the deployed pipeline
                        x = qclean if b == 0 else quantize_boundary(x, table=table, boundary=b, method=midx[m], bits=k)
                        x = chain.run_stage(b + 1, x)
                    counts[(m, k)].add(x, labels, reference)
            bar.update(len(batch.ids))
    finally:
        bar.close()
    if fp.n == 0:
        raise QuantpipeError(f"no image of the {len(dataset)} selected could be read; nothing to evaluate")

    def pct(v: int, n: int) -> float:
        return 100.0 * v / n

    rows = []
    for m in methods:
        for k in bits:
            c = fp if k == 32 else counts[(m, k)]
            rows.append(AccuracyRow(m, k, pct(c.top1, c.n) if labelled else None, pct(c.top5, c.n) if labelled else None,
                                    pct(c.agree, c.n), c.n))
    values = [int(np.prod(chain.manifest.boundaries[b].shape[1:])) * fp.n for b in range(nb)]
    mse = [MseRow(b, m, k, sse[(b, m, k)] / values[b], sse[(b, m, k)] / max(sumsq[b], 1e-300))
           for b in range(nb) for m in methods for k in qbits]
    return EvalResult(pct(fp.top1, fp.n) if labelled else None, pct(fp.top5, fp.n) if labelled else None, fp.n,
                      rows, mse)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", required=True, help="export directory (quantpipe export --out)")
    parser.add_argument("--table", required=True, help="clip table written by quantpipe calibrate")
    add_dataset_arguments(parser)
    parser.add_argument("--bits", default=",".join(map(str, DEFAULT_EVAL_BITS)),
                        help=f"bitwidths to evaluate, 32 = fp32 (default: {','.join(map(str, DEFAULT_EVAL_BITS))})")
    parser.add_argument("--methods", help="methods of the table to evaluate (default: all of them)")
    parser.add_argument("--out", help="directory for accuracy.csv, mse.csv, report.md, results.json, accuracy.png")
    parser.add_argument("--allow-overlap", action="store_true",
                        help="evaluate even on images the table was calibrated on (results are then optimistic)")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # Refuse an unusable --out now, not after the whole evaluation.
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory for the reports")
    bits = sorted(set(parse_int_list(args.bits, "--bits")), reverse=True)
    unknown = [b for b in bits if b not in WIRE_BITS]
    if unknown:
        raise ConfigError(f"--bits {','.join(map(str, unknown))}: a boundary can carry only {', '.join(map(str, WIRE_BITS))} bits")
    dataset = dataset_from_args(args)
    with StageChain(args.stages, backend=args.engine, threads=args.threads) as chain:
        table = ClipTable.load(args.table, manifest=chain.manifest)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(table.methods)
        for m in methods:
            table.method_index(m)  # unknown names fail before any work
        overlap = check_disjoint(table, dataset)
        if overlap:
            what = (f"{overlap} of the {len(dataset)} evaluation images were" if overlap > 0 else
                    "it cannot be checked (the calibration data named in the table is gone) whether the evaluation images were")
            msg = (f"{what} used to calibrate {args.table}; "
                   f"choose disjoint images (e.g. --offset past the calibration's --per-class; for --dataset synthetic, "
                   f"past the calibration's last image id)")
            if not args.allow_overlap:
                raise ConfigError(msg + " or pass --allow-overlap")
            log.warning(msg)
        log.info("evaluating %d images x %d methods x %d bitwidths", len(dataset), len(methods), len(bits))
        t0 = time.monotonic()
        result = evaluate(chain, table, dataset, methods, bits, batch_size=args.batch_size, workers=args.workers)
    cal = table.provenance
    result.meta = {
        "model": chain.manifest.model, "split": list(chain.manifest.split), "stages": str(Path(args.stages)),
        "table": str(args.table), "table_digest": f"{table.digest:08x}",
        "dataset": {k: v for k, v in dataset.description.items() if v is not None},
        "calibration": {"num_images": cal.get("num_images"), "dataset": cal.get("dataset")},
        "skipped": len(dataset.skipped), "seconds": round(time.monotonic() - t0, 1),
    }
    print(markdown_report(result))
    if args.out:
        paths = write_reports(result, args.out)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
