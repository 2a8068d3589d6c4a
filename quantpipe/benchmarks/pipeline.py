"""the whole data path: output rate per bitwidth and clip-table kind, and where each hop's CPU time goes

``quantpipe bench pipeline`` runs real processes (source -> N ``builtin:identity`` stages -> sink, on
loopback, as ``quantpipe run`` starts them) once per (microbatch, table method, bitwidth) and reports:

* the output rate at the sink (steady state: the first ``--warmup`` fraction of results is skipped;
  the best of ``--repeat`` interleaved rounds) and its ratio to the 32-bit rate of the same microbatch
  measured in the same invocation (target: >= 1.0 at every bitwidth: fewer bytes must never cost
  throughput);
* per stage (hop), the CPU time per microbatch of the data path by part, read from the daemons'
  Prometheus metrics (``quantpipe_datapath_cpu_seconds``): validate (receiving thread), decode, engine,
  encode, send; and validate + decode + encode over one ``np.copyto`` of the hop's float32 tensor
  timed in this process (target: <= 2).

The clip table is real: calibrated (:class:`~quantpipe.quant.observer.BoundaryObserver`, the methods of
``quantpipe calibrate``) on the source's own input pool, with a per-tensor method, a per-channel one
and a rotated one (randomized Hadamard, as calibrate stores it). Every process gets one BLAS/OpenMP
thread. Example (the figures in BENCHMARKS.md)::

    quantpipe bench pipeline --microbatch 8,32 --bits 32,16,8,4,2 --methods aciq,aciq_pc,rot_aciq_pc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.benchmarks import free_port as _free_port
from quantpipe.errors import ConfigError

__all__ = ["build_table", "run_once", "add_arguments", "run"]

PARTS = ("validate", "decode", "engine", "encode", "send")


def build_table(samples: np.ndarray, methods: list[str], bits: list[int], boundaries: int, seed: int = 0) -> Any:
    """A clip table for identity stages: every boundary sees the source's tensors ``samples`` [N, T, C]."""
    from quantpipe.calib.calibrate import resolve_methods, rotation_key
    from quantpipe.quant.observer import BoundaryObserver
    from quantpipe.quant.rotation import orthogonal_matrix
    from quantpipe.quant.table import ClipTable

    plans = resolve_methods(methods)
    c = samples.shape[-1]
    kinds = sorted({p.rotation for p in plans if p.rotation})
    mats = {k: orthogonal_matrix(c, seed=seed, kind=k) for k in kinds}
    observers = {None: BoundaryObserver(c), **{k: BoundaryObserver(c) for k in kinds}}
    for i in range(0, len(samples), 16):
        x = samples[i:i + 16]
        observers[None].update(x)
        for k in kinds:
            observers[k].update(x.reshape(-1, c) @ mats[k])
    ranges = {p.name: {b: observers[p.rotation].ranges(p.base, b) for b in bits} for p in plans}
    entries = [{"index": b, "shape": [None, *samples.shape[1:]], "channels": c, "ranges": ranges,
                "transforms": {rotation_key(k, seed): mats[k] for k in kinds}} for b in range(boundaries)]
    return ClipTable.build(methods=[p.record(seed) for p in plans], bits=bits, boundaries=entries,
                           provenance={"model": "builtin:identity", "dataset": "quantpipe bench pipeline source pool",
                                       "num_images": int(len(samples))})


def _config(path: Path, *, stages: int, shape: tuple[int, ...], microbatch: int, bits: int, method: str,
            table: str, count: int, credits: int, threads: int) -> tuple[Path, list[int]]:
    ports = [_free_port() for _ in range(stages + 1)]
    metrics = [_free_port() for _ in range(stages)]
    lines = ["[pipeline]", f"input_shape = {list(shape)}", "policy = \"fixed\"", f"fixed_bits = {bits}",
             f"bits = [{bits}]" if bits == 32 else f"bits = [32, {bits}]",
             f"clip_table = \"{table}\"", f"method = \"{method}\"",
             "target_rate = 1000000.0", f"microbatch = {microbatch}", f"credits = {credits}", f"threads = {threads}",
             "window = 10", "", "[source]", f"count = {count}", "", "[sink]",
             f"address = \"tcp://127.0.0.1:{ports[-1]}\"", "output = \"results.jsonl\"", ""]
    for k in range(stages):
        lines += ["[[stages]]", "engine = \"builtin:identity\"", f"address = \"tcp://127.0.0.1:{ports[k]}\"",
                  f"metrics_port = {metrics[k]}", ""]
    path.write_text("\n".join(lines))
    return path, metrics


def _scrape(port: int) -> dict[str, float]:
    """The data-path CPU seconds by part and the microbatch count of one stage's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "quantpipe_datapath_cpu_seconds_total":
                out[s.labels["part"]] = s.value
            elif s.name == "quantpipe_microbatches_processed_total":
                out["microbatches"] = s.value
    return out


def run_once(config: Path, metrics_ports: list[int], out: Path, warmup: float) -> dict[str, Any]:
    """One pipeline run (real processes, as ``quantpipe run`` starts them): rate at the sink and per-hop CPU."""
    from quantpipe.runtime.config import load_config
    from quantpipe.runtime.launcher import Pipeline
    from quantpipe.runtime.timeline import read_jsonl

    cfg = load_config(str(config), {})
    pipe = Pipeline(cfg, out)
    hops: list[dict[str, float]] = []
    # np.copyto of one hop's fp32 tensor, sampled while the pipeline runs: the same CPU contention as
    # the stages' codec work it is compared with (the idle best is reported too).
    shape = (cfg.microbatch, *cfg.input_shape)
    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    dst = np.empty_like(src)
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            t0 = time.thread_time()  # CPU time, like the stages' figures: preemption is not copy time
            np.copyto(dst, src)
            samples.append(time.thread_time() - t0)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        pipe.start()
        sampler.start()
        rc = pipe.wait(600.0, status=False)
        done.set()
        if rc != 0:
            raise RuntimeError(f"the sink exited with {rc}; see {out / 'logs'}")
        hops = [_scrape(p) for p in metrics_ports]
    finally:
        done.set()
        pipe.stop()
    t = np.sort(np.array([r["t"] for r in read_jsonl(out / "results.jsonl")]))
    errors = sum(1 for r in read_jsonl(out / "results.jsonl") if "error" in r)
    skip = int(len(t) * warmup)
    rate = (len(t) - 1 - skip) / max(1e-9, t[-1] - t[skip])
    per_hop = []
    for h in hops:
        n = max(1.0, h.get("microbatches", 0.0))
        per_hop.append({part: 1e3 * h.get(part, 0.0) / n for part in PARTS} | {"microbatches": int(n)})
    loaded = 1e3 * float(np.median(samples)) if samples else float("nan")
    return {"rate": float(rate), "images": int(len(t)), "errors": errors, "hops": per_hop, "copyto_loaded_ms": loaded}


def _copyto_ms(shape: tuple[int, ...], repeats: int = 30) -> float:
    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--microbatch", default="8,32", help="microbatch sizes (images), comma-separated")
    parser.add_argument("--bits", default="32,16,8,4,2", help="bitwidths, comma-separated (32 always runs)")
    parser.add_argument("--methods", default="aciq,aciq_pc,rot_aciq_pc",
                        help="clip-table methods: per tensor, per channel, rotated (those of quantpipe calibrate)")
    parser.add_argument("--stages", type=int, default=3, help="builtin:identity stages")
    parser.add_argument("--shape", default="197,192", help="per-image boundary shape")
    parser.add_argument("--images", type=int, default=3200, help="images per run")
    parser.add_argument("--credits", type=int, default=4, help="unacknowledged microbatches per link")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of results skipped before timing")
    parser.add_argument("--repeat", type=int, default=2,
                        help="rounds over all configurations (interleaved); each keeps its best rate, so a burst "
                             "of another job's load hits one round of one configuration, not the comparison")
    parser.add_argument("--out", default="", help="keep the runs (configs, logs, results) here")
    parser.add_argument("--json", default="", help="write the report as JSON to this file")


def _table_rows(report: dict[str, Any]) -> str:
    lines = ["microbatch  method        bits   img/s   x32  copyto*  per stage: validate+decode+encode ms (x copyto*)",
             "(copyto*: median CPU ms of np.copyto of the hop's fp32 tensor, sampled during that run)"]
    for mb in report["runs"]:
        base = mb["rate32"]
        for r in mb["results"]:
            hops = "  ".join(
                f"s{k}: {h['validate'] + h['decode'] + h['encode']:.2f} "
                f"({(h['validate'] + h['decode'] + h['encode']) / r['copyto_loaded_ms']:.2f}x)"
                for k, h in enumerate(r["hops"]))
            lines.append(f"{mb['microbatch']:>10}  {r['method']:<12} {r['bits']:>4}  {r['rate']:7.0f}  "
                         f"{r['rate'] / base:4.2f}  {r['copyto_loaded_ms']:6.3f}   {hops}")
        lines.append(f"{'':>10}  np.copyto of the fp32 [{mb['microbatch']}, {report['shape']}] tensor, idle best: "
                     f"{mb['copyto_ms']:.3f} ms")
    lines.append("")
    lines.append("per stage, CPU ms per microbatch: validate / decode / engine / encode / send")
    for mb in report["runs"]:
        for r in mb["results"]:
            for k, h in enumerate(r["hops"]):
                lines.append(f"  mb {mb['microbatch']:>2} {r['method']:<12} {r['bits']:>2} bit  stage {k}: "
                             + " / ".join(f"{h[p]:.3f}" for p in PARTS))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from threadpoolctl import threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"  # inherited by every process of every run
    threadpool_limits(1)
    microbatches, bits = _ints(args.microbatch, "microbatch"), _ints(args.bits, "bits")
    shape = tuple(_ints(args.shape, "shape"))
    methods = [m for m in args.methods.split(",") if m]
    if args.stages < 2:
        raise ConfigError("--stages must be at least 2 (a quantized boundary needs a stage after it)")
    quantized = sorted({b for b in bits if b != 32}, reverse=True)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qp-bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    pool = np.random.default_rng(1234).standard_normal((min(256, args.images), *shape)).astype(np.float32)
    table = build_table(pool, methods, quantized or [8], args.stages - 1)
    table_path = table.save(root / "table.json")
    report: dict[str, Any] = {"shape": ",".join(map(str, shape)), "stages": args.stages, "images": args.images,
                              "cpus": os.cpu_count(), "load": os.getloadavg()[0], "runs": []}
    for mb in microbatches:
        count = max(args.images - args.images % mb, 4 * mb)
        entry: dict[str, Any] = {"microbatch": mb, "copyto_ms": _copyto_ms((mb, *shape)), "results": []}
        combos = [("none", 32)] + [(m, b) for m in methods for b in quantized]
        best: dict[tuple[str, int], dict[str, Any]] = {}
        for round_ in range(max(1, args.repeat)):
            for method, b in combos:
                name = f"mb{mb}-{method}-{b}"
                cfg, ports = _config(root / f"{name}.toml", stages=args.stages, shape=shape, microbatch=mb, bits=b,
                                     method=methods[0] if method == "none" else method, table=str(table_path),
                                     count=count, credits=args.credits, threads=1)
                res = run_once(cfg, ports, root / name, args.warmup)
                res.update(method=method, bits=b, rates=best.get((method, b), {}).get("rates", []) + [res["rate"]])
                if (method, b) not in best or res["rate"] > best[(method, b)]["rate"]:
                    best[(method, b)] = res
                else:
                    best[(method, b)]["rates"] = res["rates"]
                print(f"  round {round_ + 1} {name}: {res['rate']:.0f} img/s", file=sys.stderr, flush=True)
        entry["results"] = [best[c] for c in combos]
        entry["rate32"] = entry["results"][0]["rate"]
        report["runs"].append(entry)
    print(_table_rows(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
