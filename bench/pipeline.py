"""Reproduce the whole-data-path figures of BENCHMARKS.md (targets.md section 2, issue 9).

Usage::

    python bench/pipeline.py                      # microbatch 8 and 32, 32/16/8/4/2 bits, 3 table kinds
    python bench/pipeline.py --microbatch 32 --bits 32,8,2 --images 1600

It is ``quantpipe bench pipeline`` with the defaults the figures were measured with; any option of
that command may be passed through.
"""

from __future__ import annotations

import sys

from quantpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "pipeline", *sys.argv[1:]]))
