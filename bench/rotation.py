"""The rotated methods' extra cost: the fast randomized-Hadamard transform against the dense product
and against the plain encode it precedes (issue 9, item 2).

Usage::

    python bench/rotation.py                       # [32,197,192] (DeiT-Tiny) and [64,197,768] (ViT-Base)

Single thread (BLAS and numba), best of N, every ratio measured in this run: ms per microbatch of
np.copyto, plain 8-bit per-channel encode and decode, Rotation.apply / invert (the fast transform),
and the dense float32 ``x @ R`` (one BLAS call), which is what the rotation cost before.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from quantpipe.quant import codec
from quantpipe.quant.rotation import Rotation, orthogonal_matrix


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32,197,192;64,197,768")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    threadpool_limits(1)
    codec.warmup()
    print(f"{'shape':<16} {'copyto':>7} {'enc8':>7} {'dec8':>7} {'rot':>7} {'unrot':>7} {'dense':>7}   "
          "rot/enc8  dense/rot  (ms; ratios in this run)")
    for text in args.shapes.split(";"):
        shape = tuple(int(v) for v in text.split(","))
        c = shape[-1]
        x = np.random.default_rng(0).laplace(0, 1, size=shape).astype(np.float32)
        out = np.empty_like(x)
        r = orthogonal_matrix(c, seed=0)
        rot = Rotation(r)
        lo, hi = np.full(c, -4, np.float32), np.full(c, 4, np.float32)
        prepared = codec.prepare_range(lo, hi, 8)
        payload = np.empty(codec.encoded_nbytes(x.size, 8), np.uint8)
        t = {
            "copyto": best_ms(lambda: np.copyto(out, x), args.repeat),
            "enc8": best_ms(lambda: prepared.encode(x, payload), args.repeat),
            "dec8": best_ms(lambda: prepared.decode(payload, out), args.repeat),
            "rot": best_ms(lambda: rot.apply(x, out), args.repeat),
            "unrot": best_ms(lambda: rot.invert(x, out), args.repeat),
            "dense": best_ms(lambda: np.matmul(x.reshape(-1, c), r, out=out.reshape(-1, c)), max(3, args.repeat // 4)),
        }
        print(f"{text:<16} " + " ".join(f"{t[k]:7.2f}" for k in ("copyto", "enc8", "dec8", "rot", "unrot", "dense"))
              + f"   {t['rot'] / t['enc8']:8.2f}  {t['dense'] / t['rot']:9.2f}   ({rot.kind}, base {getattr(rot, '_q', c)})")


if __name__ == "__main__":
    main()
