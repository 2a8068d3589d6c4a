"""Reproduce the codec-speed figure of BENCHMARKS.md (targets.md section 2).

Usage::

    python bench/codec.py            # the table: [64, 197, 768] float32, per-channel ranges, best of 20
    python bench/codec.py --json     # the same, machine-readable
    python bench/codec.py --per-tensor --bits 2,4,8
    python bench/codec.py --device cuda --repeat 15   # the GPU codec: [64,197,768], [32,197,192], [1,197,192]
                                                    # at 2,4,8,16 bits, mse_pc and rot_mse_pc, vs a device copy

It is ``quantpipe bench codec`` with the defaults the figure was measured with; any option of that
command may be passed through.
"""

from __future__ import annotations

import sys

from quantpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "codec", "--shape", "64,197,768", "--bits", "2,3,4,6,8,16", "--repeat", "20", *sys.argv[1:]]))
