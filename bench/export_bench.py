"""Reproduce the export and per-stage onnxruntime figures of BENCHMARKS.md.

For each model: time ``quantpipe export --split 4,8`` (model load, ONNX export, checker, verification), then
load every stage graph with onnxruntime on the CPU and measure its latency (median of ``--iters`` runs after
``--warmup``) and throughput (batch / median latency) at each batch size.

Usage::

    python bench/export_bench.py                       # deit_tiny (real weights) and vit_base (random weights)
    python bench/export_bench.py --models deit_tiny_patch16_224 --batches 1,16 --iters 20 --json

Weights: DeiT-Tiny uses ``../shared/data/deit-tiny`` when present; vit_base_patch16_224 uses seeded random
weights (no hub here), which changes no shape or operator, so latency is the same as with trained weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from quantpipe.cli import main as quantpipe_main
from quantpipe.engines import load_engine
from quantpipe.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTPIPE_SHARED", REPO.parent / "shared"))
CHECKPOINTS = {"deit_tiny_patch16_224": SHARED / "data" / "deit-tiny" / "deit_tiny_patch16_224.safetensors"}


def export(model: str, split: str, out: Path, verify_samples: int) -> dict:
    """Run ``quantpipe export`` and return its wall time and the phase timings it recorded."""
    argv = ["export", "--model", model, "--split", split, "--out", str(out), "--verify-samples", str(verify_samples), "-q"]
    checkpoint = CHECKPOINTS.get(model)
    if checkpoint is not None and checkpoint.is_file():
        argv += ["--checkpoint", str(checkpoint)]
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # export's own report stays out of the tables
        code = quantpipe_main(argv)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"quantpipe export failed for {model} (exit {code})")
    manifest = load_manifest(out)
    chain = next(c for c in manifest.provenance["verification"]["comparisons"] if c["name"].startswith("onnx chain"))
    return {
        "wall_s": round(wall, 2),
        "phases_s": manifest.provenance["timings_s"],
        "weights": manifest.provenance["weights"]["kind"],
        "chain_max_abs": chain["max_abs"],
        "chain_rel": chain["rel"],
        "stage_mib": [round((out / s.file).stat().st_size / 2**20, 1) for s in manifest.stages],
    }


def bench_stages(out: Path, batches: list[int], iters: int, warmup: int, threads: int | None) -> list[dict]:
    """Latency and throughput of every stage alone, at every batch size."""
    manifest = load_manifest(out)
    rows = []
    rng = np.random.default_rng(0)
    for k in range(manifest.num_stages):
        engine = load_engine(manifest.stage_path(k), backend="onnxruntime", providers=["cpu"], threads=threads)
        for batch in batches:
            x = rng.standard_normal((batch, *engine.input.shape[1:])).astype(np.float32)
            for _ in range(warmup):
                engine.run(x)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                engine.run(x)
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            rows.append({
                "stage": k, "batch": batch, "median_ms": round(median * 1e3, 2),
                "min_ms": round(min(times) * 1e3, 2), "images_per_s": round(batch / median, 1),
            })
        engine.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="deit_tiny_patch16_224,vit_base_patch16_224")
    parser.add_argument("--split", default="4,8")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--verify-samples", type=int, default=8, help="random inputs export verifies on")
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here (default: a temporary dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    import onnxruntime

    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
        "settings": {"split": args.split, "iters": args.iters, "warmup": args.warmup, "threads": args.threads},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for model in args.models.split(","):
            out = root / model
            exported = export(model, args.split, out, args.verify_samples)
            stages = bench_stages(out, batches, args.iters, args.warmup, args.threads)
            results["models"][model] = {"export": exported, "stages": stages}
            print(f"{model}: exported in {exported['wall_s']} s", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']} (CPUExecutionProvider), "
          f"threads {args.threads or 'default'}, median of {args.iters} after {args.warmup} warm-up\n")
    print("| model | weights | export wall s | load | ONNX export | verify | chain max abs (rel) |")
    print("|---|---|---|---|---|---|---|")
    for model, r in results["models"].items():
        e, p = r["export"], r["export"]["phases_s"]
        print(f"| {model} | {e['weights']} | {e['wall_s']} | {p['load_model']} | {p['export_onnx']} | "
              f"{p.get('verify', '-')} | {e['chain_max_abs']:.2e} ({e['chain_rel']:.1e}) |")
    print("\n| model | stage | batch | median ms | min ms | images/s |")
    print("|---|---|---|---|---|---|")
    for model, r in results["models"].items():
        for row in r["stages"]:
            print(f"| {model} | {row['stage']} | {row['batch']} | {row['median_ms']} | {row['min_ms']} | {row['images_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
