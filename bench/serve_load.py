"""Load benchmark of ``quantpipe serve``: throughput and p50/p99 latency at several concurrencies, next
to ``quantpipe run``'s rate for the same pipeline measured in the same invocation (issue 11).

Usage::

    python bench/serve_load.py                                   # builtin pipeline (tools/pipelines/serve-builtin.toml)
    python bench/serve_load.py --deit-stages out/deit-stages     # + DeiT-Tiny (tools/pipelines/serve-deit-tiny.toml)
    python bench/serve_load.py --concurrency 1,4,16,64 --seconds 5 --first-hop float32,uint8
    python bench/serve_load.py --pipelines builtin --workers 1,8 --client-procs 6   # serve --workers N

For each pipeline it (1) runs ``quantpipe run --count N --rate 1e6`` (source -> stages -> sink, the
pipeline's own rate), then (2) starts the same stage daemons and ``quantpipe serve`` as processes,
and drives the server with the official ``tritonclient.http`` (or, with ``--client grpc``, ``tritonclient.grpc``) from client processes (threads in
each, one request = ``--images-per-request`` FP32 preprocessed images, binary tensors; ``--client raw``
sends the same KServe v2 binary request prebuilt, over ``http.client``, so that the clients take little
of the CPU the pipeline needs), measuring for
``--seconds`` after a warm-up at each concurrency. It prints one row per (pipeline, first hop,
concurrency): images/s, the ratio to ``quantpipe run``'s rate, latency p50/p99, first-hop bytes
per image, CPU cores of the server, its workers and the machine, and where a request's time went from
the server's histograms: ``front ms`` (arrival to answer in the HTTP/gRPC front), ``queue ms`` (waiting
for a microbatch and a credit), ``stages ms`` (a microbatch's trip from stage 0 to the result), the
mean microbatch size and the CPU cores each stage daemon was busy. On a small machine the clients share the CPU with the pipeline: the ratio then includes the
clients' own cost.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from quantpipe.benchmarks import free_port as _free_port
from quantpipe.benchmarks import wait_http_ready

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _config_on_free_ports(src: Path, dst: Path, stages_dir: str | None) -> Path:
    """A copy of ``src`` whose addresses are free loopback ports (and stages_dir set, if given)."""
    text = src.read_text()
    text = re.sub(r'tcp://127\.0\.0\.1:\d+', lambda m: f"tcp://127.0.0.1:{_free_port()}", text)
    if stages_dir:
        text = re.sub(r'^stages_dir = .*$', f'stages_dir = "{Path(stages_dir).resolve()}"', text, flags=re.M)
    dst.write_text(text)
    return dst


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "quantpipe.cli", *args], env=ENV, cwd=ROOT, **kw)


def run_rate(config: Path, count: int, out: Path) -> float:
    """``quantpipe run``'s output rate (images/s) for ``count`` images offered as fast as it takes them."""
    m0, t0 = _machine_busy_s(), time.monotonic()
    p = _cli("run", "--config", str(config), "--count", str(count), "--rate", "1000000", "--out", str(out), "-q",
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: dict[int, tuple[int, list[tuple[float, float]]]] = {}  # stage pid -> (index, [(wall t, CPU s)])
    n_stages = len(re.findall(r"^\[\[stages\]\]", config.read_text(), re.M))
    deadline = time.monotonic() + 600
    while p.poll() is None:  # the stage daemons' CPU, sampled every 0.1 s while they run
        # scan /proc for the launcher's children only until every stage daemon is known
        for kid in list(samples) if len(samples) >= n_stages else _children(p.pid):
            if kid not in samples:
                try:
                    argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"--stage" not in argv or argv.index(b"--stage") + 1 >= len(argv):
                    continue
                samples[kid] = (int(argv[argv.index(b"--stage") + 1]), [])
            samples[kid][1].append((time.time(), _cpu_s(kid)))
        if time.monotonic() > deadline:
            p.terminate()  # the launcher stops its children on SIGTERM
        time.sleep(0.1)
    if p.returncode != 0:
        raise SystemExit(f"quantpipe run failed; see {out}/logs")
    RUN_CORES.append((_machine_busy_s() - m0) / (time.monotonic() - t0))
    rate = float(json.loads((out / "summary.json").read_text())["output_rate"])
    # CPU per image over the part of the run when results flowed (from the fifth result on), start-up,
    # waiting for the source and the drain left out: CPU seconds between the samples nearest to that
    # window's ends, over the results in between
    times = sorted(r["t"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines()) if "t" in r)
    per_image = []
    for _, pts in sorted(samples.values()):
        pts = [q for q in pts if q[1] > 0]
        if len(times) < 10 or len(pts) < 2:
            per_image.append(float("nan"))
            continue
        ta = times[len(times) // 5]
        a = min(pts, key=lambda q: abs(q[0] - ta))
        b = pts[-1]  # the last sample before the daemon exited
        n = sum(1 for t in times if a[0] <= t <= b[0])
        per_image.append(1000 * (b[1] - a[1]) / n if n else float("nan"))
    RUN_STAGE_MS.append(per_image)
    return rate


RUN_CORES: list[float] = []  # cores busy on the whole machine during each quantpipe run (start-up included)
RUN_STAGE_MS: list[list[float]] = []  # CPU ms per image of each stage daemon while results flowed, per quantpipe run


def _raw_request(model: str, x: np.ndarray):
    """A reusable KServe v2 binary request (what tritonclient sends), for a client that costs little."""
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}


def _client(url: str, model: str, shape: tuple, threads: int, warm_s: float, seconds: float, kind: str, q) -> None:
    import http.client

    if kind == "tritonclient":
        import tritonclient.http as th  # the official client (needs tritonclient[http]); raw needs only http.client
    elif kind == "grpc":
        import tritonclient.grpc as tg  # the official gRPC client (tritonclient[grpc]); url is the gRPC address

    start = time.monotonic()
    t0, t1 = start + warm_s, start + warm_s + seconds
    records: list[tuple[float, int]] = []
    errors = [0]
    lock = threading.Lock()

    def work(seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        if kind == "tritonclient":
            c = th.InferenceServerClient(url, network_timeout=120, connection_timeout=120)
            inp = th.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            out = [th.InferRequestedOutput("logits", binary_data=True)]

            def call() -> None:
                c.infer(model, [inp], outputs=out)
        elif kind == "grpc":
            c = tg.InferenceServerClient(url)
            inp = tg.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out = [tg.InferRequestedOutput("logits")]

            def call() -> None:
                r = c.infer(model, [inp], outputs=out, client_timeout=120)
                if r.as_numpy("logits").shape != (shape[0], 1000):
                    raise RuntimeError("wrong logits shape")
        else:
            host, port = url.rsplit(":", 1)
            c = http.client.HTTPConnection(host, int(port), timeout=120)
            body, headers = _raw_request(model, x)
            path = f"/v2/models/{model}/infer"

            def call() -> None:
                c.request("POST", path, body, headers)
                r = c.getresponse()
                data = r.read()
                if r.status != 200 or len(data) < 4000 * shape[0]:
                    raise RuntimeError(f"HTTP {r.status}")
        while (now := time.monotonic()) < t1:
            try:
                call()
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            done = time.monotonic()
            if now >= t0:
                with lock:
                    records.append((done - now, shape[0]))
        c.close()

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put((records, errors[0]))


def load(url: str, model: str, shape: tuple, concurrency: int, warm_s: float, seconds: float,
         kind: str = "raw", client_procs: int = 4) -> dict:
    """Drive the server at ``concurrency`` requests in flight; throughput and latency percentiles."""
    procs_n = min(concurrency, client_procs)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    per = [concurrency // procs_n + (i < concurrency % procs_n) for i in range(procs_n)]
    procs = [ctx.Process(target=_client, args=(url, model, shape, n, warm_s, seconds, kind, q)) for n in per]
    for p in procs:
        p.start()
    results = [q.get(timeout=warm_s + seconds + 300) for _ in procs]
    for p in procs:
        p.join(30)
    lat = np.array([r[0] for rec, _ in results for r in rec])
    images = sum(r[1] for rec, _ in results for r in rec)
    return {"concurrency": concurrency, "images_per_s": images / seconds, "requests": len(lat),
            "errors": sum(e for _, e in results),
            "p50_ms": 1000 * float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": 1000 * float(np.percentile(lat, 99)) if len(lat) else float("nan")}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc; 0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat; 0 where unreadable)."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        return 0.0


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


#: Histograms whose means over a level say where a request's time goes (sums and counts are summed over labels).
_STAGES = {"server": "quantpipe_serve_request_seconds", "queue": "quantpipe_serve_queue_seconds",
           "pipeline": "quantpipe_serve_pipeline_seconds", "batch": "quantpipe_serve_batch_images"}


def _histograms(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of :data:`_STAGES` from the server's /metrics."""
    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    out = {}
    for key, name in _STAGES.items():
        sums = [float(v) for v in re.findall(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        counts = [float(v) for v in re.findall(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        out[key] = (sum(sums), sum(counts))
    return out


def _means(before: dict, after: dict) -> dict[str, float]:
    """Mean of each histogram over the observations between two scrapes (ms for times)."""
    out = {}
    for key in _STAGES:
        ds, dn = after[key][0] - before[key][0], after[key][1] - before[key][1]
        out[key] = (ds / dn) * (1 if key == "batch" else 1000) if dn > 0 else float("nan")
    return out


def serve_levels(config: Path, first_hop: str, levels: list[int], shape: tuple, warm_s: float,
                 seconds: float, kind: str, workers: int = 1, client_procs: int = 4) -> list[dict]:
    if first_hop == "uint8" and 'engine = "stage0.onnx"' in config.read_text():
        # an export: stage 0 runs its pixel-taking graph (export --pixels-stage), which takes the uint8 hop
        pixel_config = config.with_name(config.stem + "-pixels.toml")
        pixel_config.write_text(config.read_text().replace('engine = "stage0.onnx"', 'engine = "stage0.pixels.onnx"'))
        config = pixel_config
    n = len(re.findall(r"^\[\[stages\]\]", config.read_text(), re.M))
    stages = [_cli("stage", "--config", str(config), "--stage", str(k), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL) for k in range(n)]
    port, grpc_port = _free_port(), _free_port()
    grpc = ["--grpc", f"127.0.0.1:{grpc_port}"] if kind == "grpc" else []
    server = _cli("serve", "--config", str(config), "--http", f"127.0.0.1:{port}", *grpc, "--first-hop", first_hop,
                  "--access-log-per-s", "0", "--max-queue-images", "4096", "--timeout", "120", "-q",
                  "--workers", str(workers),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"127.0.0.1:{port}"
    rows = []
    try:
        try:
            wait_http_ready(url, 120, server, poll_s=0.2)
        except TimeoutError:
            raise SystemExit("quantpipe serve did not become ready") from None
        model = json.loads(urllib.request.urlopen(f"http://{url}/v2/repository/index", data=b"").read())[0]["name"]
        for c in levels:
            b0, i0 = _metric(url, "quantpipe_serve_first_hop_bytes_total"), _metric(url, "quantpipe_serve_images_sent_total")
            kids = _children(server.pid)
            hub0, kids0, m0, t0 = _cpu_s(server.pid), sum(_cpu_s(k) for k in kids), _machine_busy_s(), time.monotonic()
            h0 = _histograms(url)
            st0 = [_cpu_s(p.pid) for p in stages]
            row = load(f"127.0.0.1:{grpc_port}" if kind == "grpc" else url, model, shape, c, warm_s, seconds, kind,
                       client_procs)
            wall = time.monotonic() - t0  # warm-up and client start included: CPU shares, not exact costs
            row["workers"] = workers
            row["server_cpu"] = (_cpu_s(server.pid) - hub0) / wall  # cores busy in the server (the hub with workers)
            row["workers_cpu"] = (sum(_cpu_s(k) for k in kids) - kids0) / wall  # cores busy in its children
            row["machine_cpu"] = (_machine_busy_s() - m0) / wall  # clients, server, workers and stages together
            row["stage_cpu"] = [(_cpu_s(p.pid) - c) / wall for p, c in zip(stages, st0)]  # cores busy in each stage
            b1, i1 = _metric(url, "quantpipe_serve_first_hop_bytes_total"), _metric(url, "quantpipe_serve_images_sent_total")
            row["first_hop_bytes_per_image"] = (b1 - b0) / max(1.0, i1 - i0)
            # where a request's time went, server side (warm-up included): arrival to answer in the front,
            # waiting in the queue for a microbatch and a credit, the microbatch's trip through the stages
            row.update({f"mean_{k}": v for k, v in _means(h0, _histograms(url)).items()})
            rows.append(row)
    finally:
        for p in [server, *stages]:
            p.send_signal(signal.SIGTERM)
        for p in [server, *stages]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    return rows


def conversion_costs() -> list[tuple[str, float]]:
    """The server's CPU per image to turn each input kind into each first hop (ms, in this process)."""
    from quantpipe.calib.data import Preprocess
    from quantpipe.serve.model import ServedModel
    from quantpipe.serve.protocol import Tensor

    pre = Preprocess.from_config({})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    px = rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    rows = []
    for hop in ("float32", "uint8"):
        m = ServedModel("m", (3, 224, 224), (1000,), hop, pre)
        for name, t in (("FP32 [8,3,224,224]", Tensor("input", "FP32", x.shape, x)),
                        ("UINT8 [8,224,224,3]", Tensor("pixels", "UINT8", px.shape, px))):
            m.to_stage_input([t])
            t0 = time.perf_counter()
            for _ in range(5):
                m.to_stage_input([t])
            rows.append((f"{name} -> {hop} hop", (time.perf_counter() - t0) / 5 / 8 * 1e3))
    return rows


def fold_check(checkpoint: str, images: str, n: int = 32) -> dict:
    """Normalization folded into stage 0, measured: DeiT-Tiny's stage 0 exported twice (as export does,
    and wrapped to take pixel values 0..255 and compute (x / 255 - mean) / std in the graph), run on
    ``n`` real images: plain on calibration's preprocessing, folded on the uint8 crop the server sends."""
    import torch

    from quantpipe.calib.data import Preprocess, open_dataset
    from quantpipe.engines import load_engine
    from quantpipe.export.model import create_model, data_config_of
    from quantpipe.export.onnx_export import export_stage
    from quantpipe.export.split import build_stages

    model = create_model("deit_tiny_patch16_224", checkpoint=checkpoint)
    stage0, stage1 = build_stages(model, [6])
    dc = data_config_of(model)

    class Pixels(torch.nn.Module):
        def __init__(self, stage: torch.nn.Module) -> None:
            super().__init__()
            self.stage = stage
            self.register_buffer("mean", torch.tensor(dc["mean"], dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(dc["std"], dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stage((x / 255.0 - self.mean) / self.std)

    pre = Preprocess.from_config(dc)
    crop = Preprocess.from_config({**dc, "mean": [0.0] * 3, "std": [1 / 255] * 3})  # pixel values 0..255
    ds = open_dataset("imagenet", images, num_images=n)
    from PIL import Image

    normalized, pixels, labels = [], [], []
    for sample in ds.samples:
        with Image.open(sample.path) as im:
            im.load()
            normalized.append(pre(im))
            pixels.append(np.rint(crop(im)))
        labels.append(sample.label)
    x, p = np.stack(normalized), np.stack(pixels).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ex = torch.from_numpy(x[:2])
        export_stage(stage0, ex, Path(tmp) / "plain.onnx", "input", "boundary0")
        export_stage(Pixels(stage0), torch.from_numpy(p[:2]), Path(tmp) / "pixels.onnx", "input", "boundary0")
        export_stage(stage1, stage0(ex), Path(tmp) / "stage1.onnx", "boundary0", "logits")
        plain, folded = load_engine(Path(tmp) / "plain.onnx"), load_engine(Path(tmp) / "pixels.onnx")
        last = load_engine(Path(tmp) / "stage1.onnx")
        b_plain, b_folded = plain.run(x), folded.run(p)
        y_plain, y_folded = last.run(b_plain), last.run(b_folded)
    scale = float(np.abs(b_plain).max())
    return {"images": len(x), "boundary_max_abs_diff": float(np.abs(b_plain - b_folded).max()),
            "boundary_rel_diff": float(np.abs(b_plain - b_folded).max()) / scale,
            "top1_agreement": float((y_plain.argmax(1) == y_folded.argmax(1)).mean()),
            "top1_plain": float((y_plain.argmax(1) == np.array(labels)).mean()),
            "top1_folded": float((y_folded.argmax(1) == np.array(labels)).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "tools/pipelines/serve-builtin.toml"))
    ap.add_argument("--deit-stages", default="", help="DeiT-Tiny export (quantpipe export --split 6); adds that pipeline")
    ap.add_argument("--deit-config", default=str(ROOT / "tools/pipelines/serve-deit-tiny.toml"))
    ap.add_argument("--pipelines", default="builtin,deit-tiny", help="which to measure (deit-tiny needs --deit-stages)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per concurrency")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--first-hop", default="float32", help="comma list of float32, uint8 (DeiT-Tiny: uint8 runs "
                    "stage0.pixels.onnx, so the export needs --pixels-stage)")
    ap.add_argument("--client", default="raw", choices=("raw", "tritonclient", "grpc"),
                    help="raw: prebuilt binary KServe v2 requests over http.client (the clients cost little, so "
                    "the figures show the front's cost); tritonclient: the official HTTP client; grpc: the official "
                    "gRPC client against the server's --grpc endpoint (KServe v2 GRPCInferenceService)")
    ap.add_argument("--deit-seconds", type=float, default=0, help="measured seconds per level for DeiT-Tiny "
                    "(default 3 x --seconds)")
    ap.add_argument("--run-images", type=int, default=0, help="images for quantpipe run (default: ~5 s worth)")
    ap.add_argument("--fold-check", default="", metavar="CHECKPOINT",
                    help="also measure DeiT-Tiny with the normalization folded into stage 0 (needs [export]; "
                    "images from --fold-images)")
    ap.add_argument("--fold-images", default=str(ROOT.parent / "shared/data/imagenet-dev"))
    ap.add_argument("--workers", default="1", help="comma list of `quantpipe serve --workers` values to measure")
    ap.add_argument("--client-procs", type=int, default=4, help="client processes driving the server (at most "
                    "one per request in flight)")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    levels = [int(v) for v in args.concurrency.split(",")]
    wanted = args.pipelines.split(",")
    pipelines = [("builtin", Path(args.config), None, args.first_hop.split(","))] if "builtin" in wanted else []
    if args.deit_stages and "deit-tiny" in wanted:
        hops = ["float32"]
        if "uint8" in args.first_hop.split(","):
            from quantpipe.manifest import load_manifest

            if load_manifest(args.deit_stages, verify=False).pixels_stage0 is None:
                raise SystemExit("--first-hop uint8 on DeiT-Tiny needs an export made with --pixels-stage")
            hops.append("uint8")
        pipelines.append(("deit-tiny", Path(args.deit_config), args.deit_stages, hops))
    print(f"load: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs; client {args.client}, "
          f"{args.images_per_request} image(s) per request, "
          f"{args.seconds:g} s per level after {args.warmup:g} s warm-up")
    if args.fold_check:
        r = fold_check(args.fold_check, args.fold_images)
        print(f"  normalization folded into stage 0 (DeiT-Tiny, {r['images']} real images): boundary max |diff| "
              f"{r['boundary_max_abs_diff']:.3g} ({r['boundary_rel_diff']:.2g} of max |x|), top-1 agreement "
              f"{100 * r['top1_agreement']:.1f} %, top-1 {100 * r['top1_plain']:.1f} % plain vs "
              f"{100 * r['top1_folded']:.1f} % folded")
    for what, ms in conversion_costs():
        print(f"  server CPU per image, {what}: {ms:.2f} ms")
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, src, stages_dir, hops in pipelines:
            cfg = _config_on_free_ports(src, Path(tmp) / f"{name}.toml", stages_dir)
            count = args.run_images or (1600 if name == "builtin" else 240)
            rate = run_rate(cfg, count, Path(tmp) / f"run-{name}")
            print(f"\n{name}: quantpipe run {rate:.1f} img/s ({count} images, {RUN_CORES[-1]:.1f} cores busy, stage CPU "
                  f"{' / '.join(f'{m:.3f}' for m in RUN_STAGE_MS[-1])} ms per image; the ratios below are to this rate)")
            print(f"{'first hop':>9} {'workers':>7} {'conc':>5} {'img/s':>8} {'vs run':>7} {'p50 ms':>8} {'p99 ms':>8} {'hop KB/img':>10} {'err':>4} {'server cores':>12} {'worker cores':>12} {'all cores':>9} {'front ms':>8} {'queue ms':>8} {'stages ms':>9} {'batch':>5}  stage cores (CPU ms per image)")
            seconds = args.seconds if name == "builtin" else (args.deit_seconds or 3 * args.seconds)
            for hop, workers in [(h, int(w)) for h in hops for w in args.workers.split(",")]:
                for r in serve_levels(cfg, hop, levels, (args.images_per_request, 3, 224, 224), args.warmup, seconds,
                                      args.client, workers, args.client_procs):
                    r.update(pipeline=name, first_hop=hop, run_images_per_s=rate, ratio=r["images_per_s"] / rate)
                    all_rows.append(r)
                    cores = " / ".join(f"{c:.2f}" for c in r["stage_cpu"])
                    per_image = " / ".join(f"{1000 * c / r['images_per_s']:.3f}" if r["images_per_s"] > 0 else "nan"
                                           for c in r["stage_cpu"])
                    print(f"{hop:>9} {workers:>7} {r['concurrency']:>5} {r['images_per_s']:>8.1f} {r['ratio']:>6.0%} {r['p50_ms']:>8.1f} "
                          f"{r['p99_ms']:>8.1f} {r['first_hop_bytes_per_image'] / 1000:>10.1f} {r['errors']:>4} {r['server_cpu']:>12.2f} {r['workers_cpu']:>12.2f} {r['machine_cpu']:>9.2f} "
                          f"{r['mean_server']:>8.1f} {r['mean_queue']:>8.1f} {r['mean_pipeline']:>9.1f} {r['mean_batch']:>5.1f}  "
                          f"{cores} ({per_image})")
            again = run_rate(cfg, count, Path(tmp) / f"run-{name}-again")
            print(f"{name}: quantpipe run again after the serve levels: {again:.1f} img/s (drift of the machine)")
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
