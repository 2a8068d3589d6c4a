"""Adaptation after bandwidth steps on real shaped links, judged by the output rate at the sink (issue 12.5).

Usage (root: network namespaces and tc tbf)::

    python bench/adaptation.py                          # the issue's setup, 48.4 -> 6.05 -> 48.4 -> 2.42 Mbit/s
    python bench/adaptation.py --runs 3 --schedule 0:48.4,15:6.05 --json

Setup (issue 12): builtin stages on DeiT-Tiny-shaped boundaries ([197, 192] per image, identity then a
1000-class head), microbatch 8, R = 30 img/s, policy window 10 microbatches (2.67 s nominal), credits 4,
``quantpipe run --shaping netns`` (stage 0 and stage 1 in their own namespaces, the link between them
shaped with tc tbf by tools/netlinks.sh). fp32 needs 0.75x of 48.4 Mbit/s, 6x of 6.05 (4 bits fit) and
15x of 2.42 (2 bits, 94 % of that link).

Per step the figures are (quantpipe.runtime.timeline.adaptation): ``settle_s``, the seconds after the
step from which the sink's output keeps up with 90 % of R (or of what the link carries at the narrowest
bitwidth, when that is less) until the next step, and that in nominal windows; the bitwidth decisions
of stage 0 in the phase and how many changes came after settling. Targets: <= 2 windows, <= 1 change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUP = {"input_shape": [197, 192], "bits": [32, 16, 8, 6, 4, 2], "window": 10, "microbatch": 8, "credits": 4,
         "target_rate": 30.0, "policy": "paper", "shaping": "netns", "burst_bytes": 8192}


def config(path: Path, schedule: str, ports: tuple[int, int, int] = (5900, 5901, 5910)) -> Path:
    lines = ["[pipeline]", *(f"{k} = {json.dumps(v)}" for k, v in {**SETUP, "bandwidth_schedule": schedule}.items())]
    lines += ["[sink]", f'address = "tcp://127.0.0.1:{ports[2]}"',
              "[[stages]]", 'engine = "builtin:identity"', f'address = "tcp://127.0.0.1:{ports[0]}"',
              "[[stages]]", 'engine = "builtin:head:1000"', f'address = "tcp://127.0.0.1:{ports[1]}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def run_once(workdir: Path, schedule: str, tail_s: float, prefix: str) -> dict:
    steps = [float(s.split(":")[0]) for s in schedule.split(",")]
    count = int(SETUP["target_rate"] * (steps[-1] + tail_s))
    cfg = config(workdir / "pipeline.toml", schedule)
    out = workdir / "out"
    env = {**os.environ, "QP_NS_PREFIX": prefix, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "quantpipe.cli", "run", "--config", str(cfg), "--out", str(out),
                           "--count", str(count)], env=env, capture_output=True, text=True,
                          timeout=steps[-1] + tail_s + 240)
    if done.returncode != 0:
        raise RuntimeError(f"quantpipe run failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    # how stage 0 measured each collapse: inside the frame by its TCP connection's acks, or as a bound
    windows = [json.loads(line) for line in (out / "events-stage0.jsonl").read_text().splitlines() if line.strip()]
    collapses = [{"bits": e["bits"], "next_bits": e["next_bits"], "mbit": round(e["bandwidth_Bps"] * 8e-6, 2),
                  "how": "tcp" if e.get("from_tcp") else "bound" if e.get("upper_bound") else "acks"}
                 for e in windows if e.get("event") == "window" and e.get("closed_early")]
    return {"wall_s": round(time.monotonic() - t, 1), "images": summary["images"], "errors": summary["errors"],
            "adaptation": summary["adaptation"], "collapses": collapses, "printed": done.stdout.strip().splitlines()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="0:48.4,15:6.05,30:48.4,45:2.42", help="s:Mbit/s steps")
    parser.add_argument("--tail", type=float, default=15.0, help="seconds streamed after the last step")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", default="", help="keep each run's output directory (events, results, logs) "
                        "under this directory as run<i>/")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/adaptation.py needs root (ip netns, tc)", file=sys.stderr)
        return 2
    window_s = SETUP["window"] * SETUP["microbatch"] / SETUP["target_rate"]
    report = {"setup": SETUP, "schedule": args.schedule, "nominal_window_s": round(window_s, 3), "runs": [],
              "load": os.getloadavg()}
    for i in range(args.runs):
        if args.keep:
            workdir = Path(args.keep) / f"run{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            r = run_once(workdir, args.schedule, args.tail, f"qa{os.getpid() % 10000}{i}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                r = run_once(Path(tmp), args.schedule, args.tail, f"qa{os.getpid() % 10000}{i}")
        report["runs"].append(r)
        if not args.json:
            print(f"run {i}: {r['images']} images, {r['errors']} errors, {r['wall_s']} s")
            for a in r["adaptation"]:
                print(f"  step t={a['step_s']:g}s: floor {a.get('floor_rate')} img/s, back after "
                      f"{a.get('settle_s')} s = {a.get('settled_after_windows')} window(s); changes after: "
                      f"{a.get('changes_after_settling')}; bits {a['decisions']}")
            print("  windows closed early (stage 0): " + ("; ".join(
                f"{c['bits']} -> {c['next_bits']} bits on {c['mbit']} Mbit/s ({c['how']})" for c in r["collapses"])
                or "none"))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
