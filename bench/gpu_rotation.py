"""The fused rotated GPU kernels, warp-shuffle (``FastRotation``) against tiled (``TiledRotation``).

For each shape and bitwidth: device-to-device copy time of the float32 tensor, and encode / decode time
of each kernel variant (CUDA-graph replays timed with events, median of --repeat; inputs rotate over
buffers of 4x the L2 cache, as ``quantpipe bench codec --device cuda`` does), as x copy. Every variant's
payload is compared byte for byte with the warp kernel's, and its decoded floats bit for bit.
The tiled kernels are also swept over tile rows and block sizes (``--sweep``), to choose the defaults.

    python bench/gpu_rotation.py [--bits 2,8,16] [--sweep] [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantpipe.benchmarks.codec import synthetic_activations  # noqa: E402
from quantpipe.benchmarks.pipeline import build_table  # noqa: E402
from quantpipe.quant import codec  # noqa: E402

SHAPES = ((32, 197, 192), (64, 197, 768), (1, 197, 192), (8, 197, 768))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,8,16")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--sweep", action="store_true", help="also time tile rows 2..32 x blocks of 64..256 threads x "
                    "2/4/8 blocks per SM (each looping over tiles) or one block per tile")
    ap.add_argument("--shapes", default="", help="only these shapes, e.g. 32x197x192,64x197x768")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    import cupy as cp

    from quantpipe.quant.gpu import GpuBoundaryCodec, _cuda

    bits_list = [int(b) for b in args.bits.split(",")]
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    l2 = int(props.get("l2CacheSize", 64 << 20))
    print(f"device: {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}, "
          f"{_cuda._sm_count()} SMs, L2 {l2 >> 20} MiB")
    stream = cp.cuda.Stream(non_blocking=True)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    rows_out = []

    def timed(fn, inner: int) -> float:  # noqa: ANN001
        with stream:
            fn(0)
            stream.synchronize()
            stream.begin_capture()
            for i in range(inner):
                fn(i)
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            per = []
            for _ in range(args.repeat):
                start.record(stream)
                graph.launch(stream)
                stop.record(stream)
                stop.synchronize()
                per.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / inner)
        return float(np.median(per))

    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES
    for shape in shapes:
        x_host = synthetic_activations(shape, 0)
        table = build_table(synthetic_activations((8, *shape[1:]), 1), ["rot_mse_pc"], bits_list, boundaries=1)
        m = table.method_index("rot_mse_pc")
        gc = GpuBoundaryCodec(table, 0, m, stage=0)
        nbuf = max(2, min(64, -(-4 * l2 // x_host.nbytes)))
        xs = [cp.asarray(x_host) for _ in range(nbuf)]
        dst = cp.empty_like(xs[0])
        inner = max(1, min(50, int(2e8 // x_host.nbytes)))
        copy_s = timed(lambda i: dst.data.copy_from_device_async(xs[i % nbuf].data, x_host.nbytes), inner)
        c = shape[-1]
        for bits in bits_list:
            _, rotation = gc._entry(0, m, bits)
            lo_d, inv_d, step_d = gc._dev_ranges[(0, m, bits)]
            signs, base = rotation._scaled_signs, rotation._base
            variants = {}
            if _cuda.FastRotation.supports(c, rotation.groups, rotation._q):
                variants["warp"] = _cuda.FastRotation(c, rotation.groups, rotation._q, signs, base)
            variants["tiled"] = _cuda.TiledRotation(c, rotation.groups, rotation._q, signs, base)
            if args.sweep:
                for r in (2, 4, 7, 8, 16, 32):
                    for t in (64, 96, 128, 192, 256):
                        for bps in (None, 2, 4, 8):
                            tr = _cuda.TiledRotation(c, rotation.groups, rotation._q, signs, base, tile_rows=r,
                                                     threads=t, blocks_per_sm=bps)
                            if tr._smem(r, c, tr.q, tr.groups) <= tr.SMEM_LIMIT:
                                variants[f"tiled R{r} T{t}" + (f" B{bps}" if bps else "")] = tr
            nb = codec.encoded_nbytes(x_host.size, bits)
            ref_payload = ref_y = None
            for name, v in variants.items():
                payload = cp.empty(nb, np.uint8)
                y = cp.empty_like(xs[0])
                nan = cp.zeros(1, np.uint32)
                v.encode(xs[0].reshape(-1), bits, lo_d, inv_d, payload, nan)
                v.decode(payload, bits, step_d, lo_d, y.reshape(-1))
                p_host, y_host = cp.asnumpy(payload), cp.asnumpy(y)
                if ref_payload is None:
                    ref_payload, ref_y = p_host, y_host
                # CPU codec reference: the same table entry through the numpy/numba path
                same_bytes = int(np.count_nonzero(p_host != ref_payload))
                same_floats = int(np.count_nonzero(y_host.view(np.uint32) != ref_y.view(np.uint32)))
                enc = timed(lambda i: v.encode(xs[i % nbuf].reshape(-1), bits, lo_d, inv_d, payload, nan), inner)
                dec = timed(lambda i: v.decode(payload, bits, step_d, lo_d, y.reshape(-1)), inner)
                launch = v.launch(shape[0] * shape[1]) if hasattr(v, "launch") else None
                row = {"shape": list(shape), "bits": bits, "variant": name, "copy_us": copy_s * 1e6,
                       "enc_us": enc * 1e6, "dec_us": dec * 1e6, "enc_x_copy": copy_s / enc, "dec_x_copy": copy_s / dec,
                       "bytes_differ_vs_first": same_bytes, "floats_differ_vs_first": same_floats,
                       "launch": launch, "nan": int(nan.get()[0])}
                rows_out.append(row)
                print(f"{str(list(shape)):>15} {bits:>2}b {name:<16} copy {copy_s*1e6:7.1f} us  enc {enc*1e6:7.1f} "
                      f"({copy_s/enc:4.2f}x)  dec {dec*1e6:7.1f} ({copy_s/dec:4.2f}x)  differ: bytes {same_bytes} "
                      f"floats {same_floats}  launch {launch}", flush=True)
        # the CPU codec's payload for the last bitwidth, against the default (tiled) GPU kernels
        from quantpipe.quant.linkcodec import BoundaryCodec
        cpu = BoundaryCodec(table, 0, m, stage=0)
        for bits in bits_list:
            cpu_frames = cpu.encode(x_host, bits, seq=0, first_id=0)
            gpu_frames = gc.encode(xs[0], bits, seq=0, first_id=0)
            a, b = np.frombuffer(cpu_frames[1], np.uint8), np.asarray(gpu_frames[1]).view(np.uint8).reshape(-1)
            print(f"{str(list(shape)):>15} {bits:>2}b CPU codec vs GPU codec (default kernels): {int(np.count_nonzero(a != b))} "
                  f"of {a.size} payload bytes differ", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
