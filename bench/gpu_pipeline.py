"""DeiT-Tiny on one CUDA GPU as three stage daemons: the GPU codec path against the CPU codec path.

Usage (on the GPU machine, from the repository root, onnxruntime-gpu and CuPy importable)::

    python bench/gpu_pipeline.py --stages runs/gpu/stages --table runs/gpu/table.json \
        --images runs/gpu/images --out runs/gpu/pipeline

What it measures and prints (and writes as JSON to ``--out/report.json``):

1. the execution providers each stage would use and why any listed one is skipped (no EP Error block);
2. each stage's engine-only rate at batch ``--microbatch`` (device in/out through IOBinding, and the host
   path ``engine.run`` for comparison);
3. the logits of the whole chain at 32 bits on real images, GPU (CUDAExecutionProvider, device-resident)
   against the CPU chain (CPUExecutionProvider): top-1 agreement and the max abs error;
4. ``--stages`` as source -> 3 stage daemons -> sink (``quantpipe run``'s processes, unshaped loopback,
   policy fixed) at every ``--bits``, with the GPU codec (engine outputs stay on the device) and with the
   CPU codec (``QUANTPIPE_GPU_CODEC=off``: ``engine.run`` copies float32 to the host and the CPU encodes):
   the output rate, its ratio to the 32-bit rate of the same path, and per stage the wall and CPU
   milliseconds per microbatch of decode / engine / encode (the daemons' Prometheus metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantpipe.benchmarks import free_port as _free_port  # noqa: E402

PARTS = ("validate", "decode", "engine", "encode", "send")


def providers_report(stages: Path) -> dict:
    import onnxruntime as ort

    from quantpipe.engines.onnxruntime import provider_load_error

    avail = ort.get_available_providers()
    return {"onnxruntime": ort.__version__, "available": avail,
            "load_errors": {p: provider_load_error(p) for p in avail}}


def engine_rates(stages: Path, batch: int, iters: int = 50) -> list[dict]:
    import cupy as cp

    from quantpipe.engines import load_engine
    from quantpipe.manifest import load_manifest

    man = load_manifest(stages, verify=False)
    rows = []
    for k in range(len(man.stages)):
        eng = load_engine(man.stage_path(k))
        shape = (batch, *eng.input.shape[1:])
        x = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
        xd = cp.asarray(x)
        for _ in range(5):
            eng.run_device(xd)
            eng.run(x)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            y = eng.run_device(xd)
        cp.cuda.Device().synchronize()
        dev_s = (time.perf_counter() - t0) / iters
        del y
        t0 = time.perf_counter()
        for _ in range(iters):
            eng.run(x)
        host_s = (time.perf_counter() - t0) / iters
        fast = load_engine(man.stage_path(k), tf32=True)
        for _ in range(5):
            fast.run_device(xd)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            y = fast.run_device(xd)
        cp.cuda.Device().synchronize()
        tf32_s = (time.perf_counter() - t0) / iters
        del y
        fast.close()
        rows.append({"stage": k, "providers": eng.providers, "device": eng.device, "device_io_tf32_img_s": batch / tf32_s,
                     "skipped": getattr(eng, "skipped_providers", {}),
                     "device_io_img_s": batch / dev_s, "host_io_img_s": batch / host_s,
                     "device_io_ms": dev_s * 1e3, "host_io_ms": host_s * 1e3})
        eng.close()
    return rows


def logits_check(stages: Path, images: Path, batch: int) -> dict:
    import cupy as cp

    from quantpipe.calib.data import Preprocess, iter_batches, open_dataset
    from quantpipe.engines import load_engine
    from quantpipe.manifest import load_manifest

    man = load_manifest(stages, verify=False)
    pre = Preprocess.from_config(man.data_config)
    ds = open_dataset("imagenet", images)
    cpu = [load_engine(man.stage_path(k), providers=["cpu"], threads=8) for k in range(len(man.stages))]
    gpu = [load_engine(man.stage_path(k)) for k in range(len(man.stages))]
    max_err, same, n, correct_gpu, correct_cpu = 0.0, 0, 0, 0, 0
    disagree = []
    for b in iter_batches(ds, pre, batch_size=batch, workers=4):
        y = b.images
        for e in cpu:
            y = e.run(y)
        yd = cp.asarray(b.images)
        for e in gpu:
            yd = e.run_device(yd)
        g = cp.asnumpy(yd)
        max_err = max(max_err, float(np.max(np.abs(g - y))))
        same += int(np.sum(g.argmax(1) == y.argmax(1)))
        for i in np.nonzero(g.argmax(1) != y.argmax(1))[0]:
            top2 = np.sort(y[i])[-2:]
            disagree.append({"image": int(b.ids[i]), "cpu_top2_margin": float(top2[1] - top2[0]),
                             "max_abs_error": float(np.max(np.abs(g[i] - y[i])))})
        correct_gpu += int(np.sum(g.argmax(1) == b.labels))
        correct_cpu += int(np.sum(y.argmax(1) == b.labels))
        n += len(b.ids)
    return {"images": n, "top1_identical": same, "max_abs_error": max_err, "logit_scale": float(np.abs(y).max()),
            "top1_gpu": correct_gpu / max(1, n), "top1_cpu": correct_cpu / max(1, n),
            "gpu_providers": gpu[0].providers, "cpu_providers": cpu[0].providers, "disagreements": disagree,
            "gpu_describe": gpu[0].describe()}


def _scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "quantpipe_datapath_cpu_seconds_total":
                out["cpu_" + s.labels["part"]] = s.value
            elif s.name == "quantpipe_microbatches_processed_total":
                out["microbatches"] = s.value
            elif s.name == "quantpipe_stage_seconds_sum":
                out["wall_engine"] = s.value
            elif s.name == "quantpipe_codec_seconds_sum":
                out["wall_" + s.labels["op"]] = s.value
    return out


def pipeline_run(stages: Path, table: Path, out: Path, *, bits: int, microbatch: int, count: int, credits: int,
                 method: str, gpu_codec: bool, warmup: float = 0.1) -> dict:
    from quantpipe.runtime.config import load_config
    from quantpipe.runtime.launcher import Pipeline
    from quantpipe.runtime.timeline import read_jsonl

    out.mkdir(parents=True, exist_ok=True)
    ports = [_free_port() for _ in range(4)]
    metrics = [_free_port() for _ in range(3)]
    lines = ["[pipeline]", f"stages_dir = \"{stages.resolve()}\"", f"clip_table = \"{table.resolve()}\"",
             f"method = \"{method}\"", "policy = \"fixed\"", f"fixed_bits = {bits}",
             f"bits = [{bits}]" if bits == 32 else f"bits = [32, {bits}]", "target_rate = 1000000.0",
             f"microbatch = {microbatch}", f"credits = {credits}", "threads = 2", "window = 10", "shaping = \"none\"",
             "", "[source]", f"count = {count}", "", "[sink]", f"address = \"tcp://127.0.0.1:{ports[3]}\"",
             "output = \"results.jsonl\"", ""]
    for k in range(3):
        lines += ["[[stages]]", f"engine = \"stage{k}.onnx\"", f"address = \"tcp://127.0.0.1:{ports[k]}\"",
                  f"metrics_port = {metrics[k]}", ""]
    cfg_path = out / "pipeline.toml"
    cfg_path.write_text("\n".join(lines))
    if gpu_codec:
        os.environ.pop("QUANTPIPE_GPU_CODEC", None)
    else:
        os.environ["QUANTPIPE_GPU_CODEC"] = "off"
    cfg = load_config(str(cfg_path), {})
    pipe = Pipeline(cfg, out)
    try:
        pipe.start()
        rc = pipe.wait(300.0, status=False)
        if rc != 0:
            raise RuntimeError(f"the sink exited with {rc}; see {out / 'logs'}")
        hops = [_scrape(p) for p in metrics]
    finally:
        pipe.stop()
        os.environ.pop("QUANTPIPE_GPU_CODEC", None)
    results = list(read_jsonl(out / "results.jsonl"))
    t = np.sort(np.array([r["t"] for r in results]))
    skip = int(len(t) * warmup)
    rate = (len(t) - 1 - skip) / max(1e-9, t[-1] - t[skip])
    per_hop = []
    for h in hops:
        n = max(1.0, h.get("microbatches", 0.0))
        per_hop.append({k: 1e3 * v / n for k, v in h.items() if k != "microbatches"} | {"microbatches": int(n)})
    chosen = ""
    for k in range(3):
        log = (out / "logs" / f"stage{k}.log").read_text()
        for line in log.splitlines():
            if "codec on the" in line or "providers" in line:
                chosen += f"stage{k}: {line.strip()[-160:]}\n"
    return {"bits": bits, "gpu_codec": gpu_codec, "rate": float(rate), "images": len(t),
            "errors": sum(1 for r in results if "error" in r), "hops": per_hop, "log": chosen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="runs/gpu/stages")
    ap.add_argument("--table", default="runs/gpu/table.json")
    ap.add_argument("--images", default="runs/gpu/images", help="real images for the logits check ('' skips it)")
    ap.add_argument("--method", default="rot_mse_pc")
    ap.add_argument("--bits", default="32,8,2")
    ap.add_argument("--modes", default="gpu,cpu")
    ap.add_argument("--microbatch", type=int, default=32)
    ap.add_argument("--count", type=int, default=6400)
    ap.add_argument("--credits", type=int, default=4)
    ap.add_argument("--out", default="runs/gpu/pipeline")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: engines,logits,pipeline")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    stages, table, out = Path(args.stages), Path(args.table), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    report: dict = {"providers": providers_report(stages)}
    print("providers:", json.dumps(report["providers"]), flush=True)
    from quantpipe.quant import gpu

    report["gpu_codec_available"] = gpu.available()
    print("GPU codec available:", gpu.available(), gpu.unavailable_reason(), flush=True)
    if "engines" not in skip:
        report["engines"] = engine_rates(stages, args.microbatch)
        for r in report["engines"]:
            print(f"stage {r['stage']} engine-only at batch {args.microbatch}: {r['device_io_img_s']:.0f} img/s "
                  f"device in/out ({r['device_io_ms']:.2f} ms), {r['host_io_img_s']:.0f} img/s host in/out "
                  f"({r['host_io_ms']:.2f} ms), TF32 on: {r['device_io_tf32_img_s']:.0f} img/s device in/out; providers "
                  f"{r['providers']}, skipped {r['skipped']}", flush=True)
    if args.images and "logits" not in skip:
        report["logits"] = lg = logits_check(stages, Path(args.images), args.microbatch)
        print(f"logits at 32 bits, GPU chain vs CPU chain on {lg['images']} real images: top-1 identical "
              f"{lg['top1_identical']}/{lg['images']}, max abs error {lg['max_abs_error']:.3g} (max |logit| "
              f"{lg['logit_scale']:.3g}); top-1 vs labels GPU {100 * lg['top1_gpu']:.1f} %, CPU "
              f"{100 * lg['top1_cpu']:.1f} %; {lg['gpu_describe']}; disagreements {lg['disagreements']}", flush=True)
    runs = []
    if "pipeline" not in skip:
        for mode in args.modes.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                name = f"{mode}-{bits}"
                try:
                    r = pipeline_run(stages, table, out / name, bits=bits, microbatch=args.microbatch,
                                     count=args.count, credits=args.credits, method=args.method,
                                     gpu_codec=(mode == "gpu"))
                except Exception as exc:  # noqa: BLE001 - report and go on with the other runs
                    print(f"{name}: FAILED {exc}", flush=True)
                    runs.append({"mode": mode, "bits": bits, "error": str(exc)})
                    continue
                r["mode"] = mode
                runs.append(r)
                print(f"{name}: {r['rate']:.0f} img/s ({r['images']} images, {r['errors']} errors)", flush=True)
                print(r["log"], end="", flush=True)
    report["pipeline"] = runs
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if runs:
        print("\npath  bits   img/s  x32   per stage ms/microbatch wall decode+engine+encode (CPU decode/engine/encode)")
        for mode in args.modes.split(","):
            ok = [r for r in runs if r.get("mode") == mode and "rate" in r]
            base = next((r["rate"] for r in ok if r["bits"] == 32), float("nan"))
            for r in ok:
                hops = "  ".join(
                    f"s{k}: {h.get('wall_decode', 0):.2f}+{h.get('wall_engine', 0):.2f}+{h.get('wall_encode', 0):.2f}"
                    f" ({h.get('cpu_decode', 0):.2f}/{h.get('cpu_engine', 0):.2f}/{h.get('cpu_encode', 0):.2f})"
                    for k, h in enumerate(r["hops"]))
                print(f"{mode:>4}  {r['bits']:>4}  {r['rate']:6.0f}  {r['rate'] / base:4.2f}   {hops}")
        if "engines" in report:
            slow = min(r["device_io_img_s"] for r in report["engines"])
            print(f"slowest stage engine-only (device in/out): {slow:.0f} img/s; 0.5 x = {0.5 * slow:.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
