"""pipeline.threads bounds a stage's BLAS/OpenMP pools (threadpoolctl), not only its engine's threads.

Three builtin:linear stages on 2 cores ran 3x slower with numpy's default one-BLAS-thread-per-core
(BENCHMARKS.md); a stage must use the threads it is given for everything it runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
from threadpoolctl import threadpool_info
from quantpipe.runtime.config import load_config
from quantpipe.runtime.stage import StageDaemon
daemon = StageDaemon(load_config(sys.argv[1], {}), 0)
try:
    print(json.dumps([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]))
finally:
    daemon.close()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_stage_limits_blas_to_pipeline_threads(tmp_path, threads):
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"""
[pipeline]
input_shape = [197, 192]
threads = {threads}
[sink]
address = "tcp://127.0.0.1:{_port()}"
[[stages]]
engine = "builtin:linear"
address = "tcp://127.0.0.1:{_port()}"
[[stages]]
engine = "builtin:identity"
address = "tcp://127.0.0.1:{_port()}"
""")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "4"  # what a many-core default would give, on any CI machine
    out = subprocess.run([sys.executable, "-c", _PROBE, str(cfg)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    pools = json.loads(out.stdout.strip().splitlines()[-1])
    assert pools and all(n == threads for n in pools), pools
