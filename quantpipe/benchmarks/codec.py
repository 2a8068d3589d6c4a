"""Codec throughput versus np.copyto on the same tensor, and bytes per frame, per bitwidth.

The figure of targets.md section 2: on a ``[64, 197, 768]`` float32 microbatch (a ViT-Base boundary),
single thread, encode (clip + quantize + pack) and decode (unpack + dequantize) each move input float32
bytes at >= 0.5x the rate of ``np.copyto`` on the same array, measured in the same run, at 2, 4 and 8
bits. Speeds on a shared machine are noisy, so every timing is the best of ``--repeat`` runs, and the
copy is timed in the same loop as the codec (the ratio is what counts, not the absolute GB/s).

The tensor imitates a ViT residual stream: per-channel Laplace values with log-normal scales and
offsets and a few outlier channels ten times wider; its clip ranges are the 0.05 / 99.95 percentiles of
its first samples, as a calibration would give, so about 0.1% of the values exercise clipping.

``--device cuda`` measures the GPU codec (:mod:`quantpipe.quant.gpu`) instead (:func:`measure_cuda`):
per tensor shape (by default a ViT-Base microbatch [64, 197, 768], a DeiT-Tiny microbatch
[32, 197, 192] and one DeiT-Tiny image [1, 197, 192]), bitwidth and method (per channel, plain and
rotated), the device-side encode and decode against a device-to-device copy of the same tensor in the
same run (CUDA events, median; inputs rotate over buffers larger than the L2 cache), and the whole way
from an engine's output in device memory to the payload bytes on the host: GPU encode + payload copy
versus float32 copy + CPU encode.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from quantpipe.errors import ConfigError
from quantpipe.quant import codec
from quantpipe.quant.primitives import WIRE_BITS
from quantpipe.wire import HEADER_SIZE

__all__ = ["BitsResult", "synthetic_activations", "calibration_ranges", "measure", "format_table", "add_arguments", "run"]

DEFAULT_SHAPE = (64, 197, 768)
DEFAULT_BITS = (2, 3, 4, 6, 8, 16)
#: Bitwidths that targets.md section 2 holds to >= 0.5x np.copyto.
TARGET_BITS = (2, 4, 8)
TARGET_RATIO = 0.5


@dataclass(frozen=True)
class BitsResult:
    """One bitwidth's figures. Speeds are input float32 bytes per second (best of the repeats)."""

    bits: int
    encode_gbps: float
    encode_vs_copy: float
    decode_gbps: float
    decode_vs_copy: float
    decode_alloc_vs_copy: float
    payload_bytes: int
    frame_bytes: int
    ideal_bytes: int
    overhead_bytes: int


def synthetic_activations(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A float32 tensor shaped like a ViT boundary: per-channel Laplace with a few outlier channels."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    scale = np.exp(rng.normal(0.0, 0.5, channels))
    scale[rng.choice(channels, size=max(1, channels // 200), replace=False)] *= 10.0
    offset = rng.normal(0.0, 0.3, channels)
    x = rng.laplace(size=shape).astype(np.float32)
    x *= scale.astype(np.float32)
    x += offset.astype(np.float32)
    return x


def calibration_ranges(x: np.ndarray, per_tensor: bool, samples: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Clip ranges from the 0.05 / 99.95 percentiles of the first ``samples`` samples of ``x``."""
    calib = x[:samples].reshape(-1, x.shape[-1])
    axis = None if per_tensor else 0
    lo = np.percentile(calib, 0.05, axis=axis).astype(np.float32)
    hi = np.percentile(calib, 99.95, axis=axis).astype(np.float32)
    return lo, hi


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    shape: tuple[int, ...] = DEFAULT_SHAPE,
    bits_list: tuple[int, ...] = DEFAULT_BITS,
    repeat: int = 20,
    per_tensor: bool = False,
    seed: int = 0,
) -> dict:
    """Time np.copyto, encode and decode on one synthetic tensor; return a JSON-ready dict.

    Each repeat times the copy and then every bitwidth's encode, decode into a reused buffer (what a
    stage daemon does) and decode into a fresh array, so that all of them see the same machine load.
    """
    x = synthetic_activations(shape, seed)
    lo, hi = calibration_ranges(x, per_tensor)
    backend = codec.warmup()
    dst = np.empty_like(x)
    out = np.empty_like(x)
    payloads = {b: codec.encode(x, b, lo, hi) for b in bits_list}
    copy_t: list[float] = []
    enc_t = {b: [] for b in bits_list}
    dec_t = {b: [] for b in bits_list}
    alloc_t = {b: [] for b in bits_list}
    for _ in range(repeat):
        copy_t.append(_seconds(lambda: np.copyto(dst, x)))
        for b in bits_list:
            enc_t[b].append(_seconds(lambda b=b: codec.encode(x, b, lo, hi)))
            dec_t[b].append(_seconds(lambda b=b: codec.decode(payloads[b], shape, b, lo, hi, out=out)))
            alloc_t[b].append(_seconds(lambda b=b: codec.decode(payloads[b], shape, b, lo, hi)))
    copy_s = min(copy_t)
    results = []
    for b in bits_list:
        ideal = math.ceil(x.size * b / 8)
        payload = int(payloads[b].size)
        results.append(BitsResult(
            bits=b,
            encode_gbps=x.nbytes / min(enc_t[b]) / 1e9,
            encode_vs_copy=copy_s / min(enc_t[b]),
            decode_gbps=x.nbytes / min(dec_t[b]) / 1e9,
            decode_vs_copy=copy_s / min(dec_t[b]),
            decode_alloc_vs_copy=copy_s / min(alloc_t[b]),
            payload_bytes=payload,
            frame_bytes=HEADER_SIZE + payload,
            ideal_bytes=ideal,
            overhead_bytes=HEADER_SIZE + payload - ideal,
        ))
    checked = [r for r in results if r.bits in TARGET_BITS]
    return {
        "benchmark": "codec",
        "shape": list(shape),
        "values": int(x.size),
        "input_bytes": int(x.nbytes),
        "ranges": "per-tensor" if per_tensor else "per-channel",
        "backend": backend,
        "threads": 1,
        "repeat": repeat,
        "timing": "best of repeat",
        "copy_gbps": x.nbytes / copy_s / 1e9,
        "copy_seconds": copy_s,
        "results": [asdict(r) for r in results],
        "target": {
            "bits": [r.bits for r in checked],
            "min_ratio": TARGET_RATIO,
            "met": bool(checked) and all(min(r.encode_vs_copy, r.decode_vs_copy) >= TARGET_RATIO for r in checked),
        },
    }


def format_table(report: dict) -> str:
    """The human-readable table of :func:`measure`'s result."""
    lines = [
        f"codec benchmark: shape {tuple(report['shape'])} float32 ({report['input_bytes'] / 1e6:.1f} MB), "
        f"{report['ranges']} ranges, backend {report['backend']}, 1 thread, best of {report['repeat']}",
        f"np.copyto on the same array: {report['copy_gbps']:.2f} GB/s",
        "",
        f"{'bits':>4} {'enc GB/s':>9} {'x copy':>7} {'dec GB/s':>9} {'x copy':>7} {'dec new':>8}"
        f" {'frame B':>11} {'ideal B':>11} {'overhead':>8}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['bits']:>4} {r['encode_gbps']:>9.2f} {r['encode_vs_copy']:>7.2f} {r['decode_gbps']:>9.2f}"
            f" {r['decode_vs_copy']:>7.2f} {r['decode_alloc_vs_copy']:>8.2f} {r['frame_bytes']:>11,}"
            f" {r['ideal_bytes']:>11,} {r['overhead_bytes']:>8,}"
        )
    target = report["target"]
    lines += [
        "",
        "GB/s = input float32 bytes per second; x copy = that over np.copyto's; dec = decode into a reused "
        "out= buffer, dec new = decode allocating its output (x copy); frame B = wire header + payload; "
        "ideal B = ceil(values * bits / 8).",
    ]
    if target["bits"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(
            f"target (targets.md section 2): encode and decode >= {target['min_ratio']} x copy at "
            f"{', '.join(map(str, target['bits']))} bits: {verdict}"
        )
    return "\n".join(lines)


CUDA_SHAPES = ((64, 197, 768), (32, 197, 192), (1, 197, 192))
CUDA_BITS = (2, 4, 8, 16)
CUDA_METHODS = ("mse_pc", "rot_mse_pc")
#: the microbatches (not the batch-1 tensor) are held to >= 0.7 x the device copy
CUDA_TARGET_RATIO = 0.7


def _median(values: list[float]) -> float:
    return float(np.median(np.asarray(values)))


def measure_cuda(shapes=CUDA_SHAPES, bits_list=CUDA_BITS, methods=CUDA_METHODS, repeat: int = 20,
                 seed: int = 0) -> dict:
    """The GPU codec against a device copy and against the CPU path; a JSON-ready dict (see the module doc)."""
    from quantpipe.benchmarks.pipeline import build_table
    from quantpipe.quant import gpu
    from quantpipe.quant.linkcodec import BoundaryCodec

    if not gpu.available():
        raise ConfigError(f"--device cuda: the GPU codec is unavailable here ({gpu.unavailable_reason()})")
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    l2 = int(props.get("l2CacheSize", 64 << 20))
    rows = []
    for shape in shapes:
        x_host = synthetic_activations(shape, seed)
        calib = synthetic_activations((8, *shape[1:]), seed + 1)  # the table's calibration samples
        table = build_table(calib, list(methods), [b for b in bits_list if b != 32], boundaries=1)
        nbuf = max(2, min(64, -(-4 * l2 // x_host.nbytes)))  # inputs over 4x the L2 cache
        xs = [cp.asarray(x_host) for _ in range(nbuf)]
        dst = cp.empty_like(xs[0])
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        inner = max(1, min(50, int(2e8 // x_host.nbytes)))

        stream = cp.cuda.Stream(non_blocking=True)

        def timed(fn) -> float:  # noqa: ANN001
            """Device seconds per call: `inner` calls captured in a CUDA graph, its replays timed with
            events (median of `repeat`), so that Python's launch overhead stays out of the figure."""
            with stream:
                fn(0)
                stream.synchronize()
                graph = None
                try:
                    stream.begin_capture()
                    for i in range(inner):
                        fn(i)
                    graph = stream.end_capture()
                except NotImplementedError:  # e.g. cuBLAS (the dense rotation) cannot be captured
                    try:
                        stream.end_capture()
                    except Exception:  # noqa: BLE001
                        pass
                    graph = None
                run = (lambda: graph.launch(stream)) if graph is not None else (lambda: [fn(i) for i in range(inner)])
                run()
                stream.synchronize()
                per = []
                for _ in range(repeat):
                    start.record(stream)
                    run()
                    stop.record(stream)
                    stop.synchronize()
                    per.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / inner)
            return _median(per)

        copy_s = timed(lambda i: dst.data.copy_from_device_async(xs[i % nbuf].data, x_host.nbytes))
        pinned = cp.cuda.alloc_pinned_memory(x_host.nbytes)
        host_fp32 = np.frombuffer(pinned, np.float32, x_host.size).reshape(shape)
        for mname in methods:
            m = table.method_index(mname)
            gc = gpu.GpuBoundaryCodec(table, 0, m, stage=0)
            cc = BoundaryCodec(table, 0, m, stage=0)
            for bits in bits_list:
                payload = cp.empty(codec.encoded_nbytes(x_host.size, bits), np.uint8)
                out = cp.empty_like(xs[0])
                enc_s = timed(lambda i: gc.encode_device(xs[i % nbuf], bits, payload))
                gc.encode_device(xs[0], bits, payload)
                dec_s = timed(lambda i: gc.decode_device(payload, shape, bits, out))
                # engine output (device) -> payload bytes on the host, wall clock, median of repeat
                gpu_path, cpu_path = [], []
                for r in range(repeat):
                    y = xs[r % nbuf]
                    cp.cuda.Device().synchronize()
                    t0 = time.perf_counter()
                    gc.encode(y, bits, seq=r, first_id=0)
                    t1 = time.perf_counter()
                    cp.cuda.runtime.memcpyAsync(host_fp32.ctypes.data, y.data.ptr, x_host.nbytes, 2,
                                                cp.cuda.get_current_stream().ptr)
                    cp.cuda.get_current_stream().synchronize()
                    cc.encode(host_fp32, bits, seq=r, first_id=0)
                    t2 = time.perf_counter()
                    gpu_path.append(t1 - t0)
                    cpu_path.append(t2 - t1)
                rows.append({
                    "shape": list(shape), "method": mname, "bits": bits,
                    "rotated": table.transform(0, m) is not None,
                    "copy_us": copy_s * 1e6, "encode_us": enc_s * 1e6, "decode_us": dec_s * 1e6,
                    "encode_vs_copy": copy_s / enc_s, "decode_vs_copy": copy_s / dec_s,
                    "copy_gbps": 2 * x_host.nbytes / copy_s / 1e9,
                    "encode_gbps": (x_host.nbytes + payload.nbytes) / enc_s / 1e9,
                    "host_gpu_encode_ms": _median(gpu_path) * 1e3, "host_cpu_encode_ms": _median(cpu_path) * 1e3,
                    "host_speedup": _median(cpu_path) / _median(gpu_path),
                    "payload_bytes": int(payload.nbytes), "fp32_bytes": int(x_host.nbytes),
                })
    checked = [r for r in rows if r["shape"][0] > 1]
    return {
        "benchmark": "codec", "device": name, "repeat": repeat, "timing": "CUDA graph replays timed with events, median",
        "results": rows,
        "target": {"min_ratio": CUDA_TARGET_RATIO, "applies_to": "microbatches (batch > 1), encode and decode",
                   "met": bool(checked) and all(min(r["encode_vs_copy"], r["decode_vs_copy"]) >= CUDA_TARGET_RATIO
                                                for r in checked)},
    }


def format_cuda_table(report: dict) -> str:
    """The human-readable table of :func:`measure_cuda`'s result."""
    lines = [f"GPU codec benchmark on {report['device']} ({report['timing']} of {report['repeat']}); per-channel ranges",
             "", f"{'shape':>14} {'method':>10} {'bits':>4} {'copy us':>8} {'enc us':>8} {'x copy':>6} {'dec us':>8}"
             f" {'x copy':>6} | {'GPU->host ms':>12} {'CPU path ms':>11} {'speedup':>7}"]
    for r in report["results"]:
        lines.append(
            f"{str(tuple(r['shape'])):>14} {r['method']:>10} {r['bits']:>4} {r['copy_us']:>8.1f} {r['encode_us']:>8.1f}"
            f" {r['encode_vs_copy']:>6.2f} {r['decode_us']:>8.1f} {r['decode_vs_copy']:>6.2f} |"
            f" {r['host_gpu_encode_ms']:>12.3f} {r['host_cpu_encode_ms']:>11.3f} {r['host_speedup']:>7.1f}")
    t = report["target"]
    lines += ["", "x copy = device-to-device copy time of the same tensor / codec time (input float32 bytes per "
              "second over the copy's); GPU->host = GPU encode + payload copy to pinned memory; CPU path = "
              "float32 copy to pinned memory + CPU encode (1 thread).",
              f"target: encode and decode >= {t['min_ratio']} x copy for the {t['applies_to'].split(',')[0]}: "
              f"{'met' if t['met'] else 'NOT met'}"]
    return "\n".join(lines)


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"--{what} is empty")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantpipe bench codec``."""
    parser.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)),
                        help="tensor shape, comma-separated (default: %(default)s, a ViT-Base microbatch of 64)")
    parser.add_argument("--bits", default=",".join(map(str, DEFAULT_BITS)),
                        help="bitwidths to measure, comma-separated, from 1-8, 16, 32 (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per measurement; the best counts (default: %(default)s)")
    parser.add_argument("--per-tensor", action="store_true", help="one clip range for the whole tensor instead of one per channel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic activations (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the CPU codec (default); cuda: the GPU codec on the current CUDA device, by default on "
                             "[64,197,768], [32,197,192] and [1,197,192] at 2,4,8,16 bits, mse_pc and rot_mse_pc")


def run(args: argparse.Namespace) -> int:
    """Measure and print the table (or JSON)."""
    if getattr(args, "device", "cpu") == "cuda":
        shapes = CUDA_SHAPES if args.shape == ",".join(map(str, DEFAULT_SHAPE)) else (_parse_ints(args.shape, "shape"),)
        bits_list = CUDA_BITS if args.bits == ",".join(map(str, DEFAULT_BITS)) else _parse_ints(args.bits, "bits")
        bad = [b for b in bits_list if b not in WIRE_BITS or b == 32]
        if bad:
            raise ConfigError(f"--bits {bad} not supported on the GPU benchmark: choose from 1-8, 16")
        report = measure_cuda(shapes, bits_list, repeat=args.repeat, seed=args.seed)
        print(json.dumps(report, indent=2) if args.json else format_cuda_table(report))
        return 0
    shape = _parse_ints(args.shape, "shape")
    if any(d <= 0 for d in shape) or len(shape) < 2:
        raise ConfigError(f"--shape needs at least two positive dimensions (samples, ..., channels), got {args.shape!r}")
    bits_list = _parse_ints(args.bits, "bits")
    bad = [b for b in bits_list if b not in WIRE_BITS]
    if bad:
        raise ConfigError(f"--bits {bad} not supported: choose from {', '.join(map(str, WIRE_BITS))}")
    if args.repeat < 1:
        raise ConfigError("--repeat must be at least 1")
    report = measure(shape, bits_list, args.repeat, args.per_tensor, args.seed)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
