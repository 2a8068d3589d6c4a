"""A busy next stage is not a slow link: the upstream's bandwidth measurement must not see compute.

Real processes on an unshaped loopback link: stage 0 (adaptive, the paper's policy) feeds stage 1, a
``builtin:sleep`` engine that takes 40 ms per microbatch of 4 DeiT-Tiny boundaries, so the pipeline
cannot exceed 100 images/s against a 400 images/s target. Fp32 at the target needs 60 MB/s, far below
what loopback carries, so the right bitwidth is 32 throughout. Had stage 1 acknowledged a frame only
when its loop picked it up (after the previous engine run), stage 0 would have measured about
605 KB per 40 ms = 15 MB/s and dropped to 8 bits or less for nothing.
"""

from __future__ import annotations

import json

import pytest

from bench.chaos import Cluster, Setup

pytestmark = pytest.mark.slow

SHAPE = (197, 192)
MICROBATCH = 4
TARGET = 400.0  # images/s: 4x what the sleeping stage can do
FP32_DEMAND = TARGET * 4 * SHAPE[0] * SHAPE[1]  # bytes/s fp32 would need at the target


def test_a_compute_bound_downstream_does_not_lower_the_bitwidth(tmp_path):
    setup = Setup(engines=("builtin:identity", "builtin:sleep:40"), input_shape=SHAPE, count=240, rate=TARGET,
                  microbatch=MICROBATCH, extra={"policy": "paper", "bits": [32, 16, 8, 6, 4, 2], "window": 10})
    with Cluster(tmp_path, setup) as c:
        c.start()
        assert c.procs["sink"].wait(60) == 0, c.log_tail("sink")
        lines = c.lines()
    events = [json.loads(x) for x in (tmp_path / "events-stage0.jsonl").read_text().splitlines()]
    windows = [e for e in events if e["event"] == "window"]
    t = sorted(r["t"] for r in lines)
    rate = (len(t) - 1) / (t[-1] - t[0])
    bandwidths = sorted(w["bandwidth_Bps"] for w in windows)
    print(f"\nbusy downstream: {rate:.1f} img/s delivered (target {TARGET:g}); {len(windows)} windows at stage 0, "
          f"bits {sorted({w['next_bits'] for w in windows})}; measured bandwidth min {bandwidths[0] / 1e6:.0f} MB/s, "
          f"median {bandwidths[len(bandwidths) // 2] / 1e6:.0f} MB/s (fp32 at the target needs {FP32_DEMAND / 1e6:.0f})")
    assert len(lines) == setup.count
    assert rate < 0.4 * TARGET  # the setup really is compute-bound downstream
    assert len(windows) >= 5
    assert all(w["next_bits"] == 32 for w in windows), [(w["bandwidth_Bps"], w["next_bits"]) for w in windows]
    assert bandwidths[0] > FP32_DEMAND
