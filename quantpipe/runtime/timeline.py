"""The run's timeline: link rate, chosen bitwidth, output rate and accuracy over time; and its summary.

This is the picture of the paper's adaptation experiment (QuantPipe, Wang et al. 2022): the link rate
steps (500 -> 50 -> 250 Mbit/s), the stage switches bitwidth, the output rate holds the target. It is
built after (or during) a run from the files ``quantpipe run`` leaves in its output directory:

* ``results.jsonl`` (sink: one line per image with its arrival time ``t``),
* ``labels.jsonl`` (source: the label of each image id, -1 when unknown),
* ``events-stage<K>.jsonl`` (stage K: one line per policy window, per rate change, and at start).

:func:`build` bins them into rows (one per ``bin_s`` seconds), :func:`write_csv` and :func:`plot`
write ``timeline.csv`` / ``timeline.png`` (matplotlib is imported only there), :func:`adaptation`
measures, after each step of the schedule, how long the pipeline took to settle **judged by the output
rate at the sink** (:func:`output_settle`), in seconds and in nominal policy windows, and how often the
stage changed bitwidth after that (oscillation). Counting bitwidth decisions instead would call a
pipeline settled while the frames already encoded at the old bitwidth still throttle its output.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantpipe.runtime.shaping import RateSchedule

__all__ = ["Row", "read_jsonl", "build", "write_csv", "plot", "adaptation", "output_settle", "summary"]


@dataclass
class Row:
    t: float  # seconds since t0 (start of the bin)
    link_mbit: float  # schedule rate in force (nan: unshaped)
    bits: float  # bitwidth the first shaped stage was sending at the end of the bin
    bandwidth_mbit: float  # that stage's latest bandwidth estimate
    output_rate: float  # results per second in the bin
    accuracy: float  # top-1 of the labelled results of the trailing accuracy window (nan: none)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping a partially written last line (the file may still grow)."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def build(out_dir: Path, t0: float, schedule: RateSchedule | None, *, stage: int = 0, bin_s: float = 1.0,
          t_end: float | None = None, accuracy_s: float = 10.0) -> list[Row]:
    """Bin a run's files into rows from ``t0`` (wall clock) to the last result (or ``t_end``); the
    accuracy of a row is over the results of the trailing ``accuracy_s`` seconds."""
    results = read_jsonl(out_dir / "results.jsonl")
    labels = {r["id"]: r["label"] for r in read_jsonl(out_dir / "labels.jsonl")}
    windows = [e for e in read_jsonl(out_dir / f"events-stage{stage}.jsonl") if e.get("event") == "window"]
    end = t_end if t_end is not None else max([r["t"] for r in results if "t" in r] + [t0])
    n = max(1, math.ceil((end - t0) / bin_s))
    rows = []
    bits, bw, wi = math.nan, math.nan, 0
    for i in range(n):
        lo, hi = t0 + i * bin_s, t0 + (i + 1) * bin_s
        while wi < len(windows) and windows[wi]["t"] < hi:
            bits, bw = windows[wi]["next_bits"], windows[wi]["bandwidth_Bps"] * 8 / 1e6
            wi += 1
        in_bin = [r for r in results if "t" in r and lo <= r["t"] < hi]
        # Top-1 of one bin's handful of images is mostly noise: score the trailing accuracy_s instead.
        recent = [r for r in results if "top5" in r and hi - accuracy_s <= r["t"] < hi and labels.get(r["id"], -1) >= 0]
        acc = sum(r["top5"][0][0] == labels[r["id"]] for r in recent) / len(recent) if recent else math.nan
        rows.append(Row(round(i * bin_s, 3), schedule.rate_at(i * bin_s) if schedule else math.nan, bits, bw,
                        len(in_bin) / bin_s, acc))
    return rows


def write_csv(rows: list[Row], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "link_mbit", "bits", "bandwidth_estimate_mbit", "output_rate_img_s", "top1"])
        for r in rows:
            w.writerow([r.t, r.link_mbit, r.bits, round(r.bandwidth_mbit, 3), r.output_rate, r.accuracy])
    return path


def plot(rows: list[Row], path: Path, *, target_rate: float, title: str = "") -> Path:
    """Four stacked panels sharing the time axis, like the paper's adaptation figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.t for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(9, 8), sharex=True)
    ax[0].step(t, [r.link_mbit for r in rows], where="post", label="link rate (schedule)")
    ax[0].plot(t, [r.bandwidth_mbit for r in rows], ".", label="measured (acked bytes / busy time)")
    ax[0].set_ylabel("Mbit/s")
    ax[0].legend(loc="upper right", fontsize=8)
    ax[1].step(t, [r.bits for r in rows], where="post", color="C2")
    ax[1].set_ylabel("bitwidth")
    ax[1].set_yticks([2, 4, 6, 8, 16, 32])
    ax[2].plot(t, [r.output_rate for r in rows], color="C3")
    ax[2].axhline(target_rate, color="grey", ls="--", lw=1, label=f"target {target_rate:g} img/s")
    ax[2].set_ylabel("images/s")
    ax[2].legend(loc="upper right", fontsize=8)
    ax[3].plot(t, [100 * r.accuracy for r in rows], color="C4")
    ax[3].set_ylabel("top-1 % (10 s)")
    ax[3].set_xlabel("time (s)")
    fig.suptitle(title or "QuantPipe adaptation: link rate, bitwidth, output rate, accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def output_settle(times: list[float], start: float, end: float, floor: float, *, slack_images: int = 0,
                  tolerance: float = 0.10, step_s: float = 0.05) -> float | None:
    """Seconds after ``start`` from which the output keeps up with ``floor`` images/s until ``end``.

    ``times`` are the sink's result times (seconds, same clock as ``start``/``end``). Settled at ``s`` means
    that from ``start + s`` on, every result time ``t`` up to ``end`` has at least
    ``(1 - tolerance) * floor * (t - (start + s)) - slack_images`` results since ``start + s``, and so does
    ``end`` itself: the output rate is back within ``tolerance`` of ``floor`` and stays there (a rate above
    it, while a backlog drains, counts as kept up), and a result comes within a microbatch's time of
    ``start + s``. ``slack_images`` (one microbatch) absorbs that results arrive a microbatch at a time.
    None: it never settled in the phase.
    """
    ts = sorted(t for t in times if start <= t < end)
    need = (1.0 - tolerance) * floor
    s = 0.0
    while start + s < end:
        lo = start + s
        after = [t for t in ts if t >= lo]
        ok = bool(after) and after[0] - lo <= max(slack_images, 1) / need  # output is flowing again
        ok = ok and all(n + 1 >= need * (t - lo) - slack_images for n, t in enumerate(after))
        if ok and len(after) >= need * (end - lo) - slack_images:
            return round(s, 3)
        s += step_s
    return None


def adaptation(events: list[dict[str, Any]], steps: list[float], t0: float, *,
               results: list[dict[str, Any]] | None = None,
               target_rate: float | None = None, floors: list[float] | None = None, window_s: float | None = None,
               microbatch: int = 0, t_end: float | None = None) -> list[dict[str, Any]]:
    """For each step time (seconds after ``t0``): when the output rate was back (see :func:`output_settle`;
    needs ``results`` and ``target_rate``), that in nominal windows (``window_s``), the bitwidth decisions
    and how many changes happened after that moment (0 or 1 = no oscillation). ``floors`` is the rate
    to be back to per step (default ``target_rate``; below it when even the narrowest bitwidth cannot
    carry R on that step's link). The decision-based ``settled_after_windows`` of earlier versions is
    kept as ``decisions_settled_after_windows``."""
    windows = [e for e in events if e.get("event") == "window"]
    times = [r["t"] - t0 for r in (results or []) if "t" in r]
    last = t_end if t_end is not None else (max(times) if times else math.inf)
    out = []
    for i, start in enumerate(steps):
        end = steps[i + 1] if i + 1 < len(steps) else math.inf
        before = [w for w in windows if w["t"] - t0 < start]
        phase = [w for w in windows if start <= w["t"] - t0 < end]
        # A change is a decision that differs from the previous decision (a window that straddles a
        # switch still reports the old bits as its majority, which is not a new change).
        prev = before[-1]["next_bits"] if before else None
        changes = []
        for j, w in enumerate(phase):
            if prev is not None and w["next_bits"] != prev:
                changes.append(j)
            prev = w["next_bits"]
        settle = (changes[-1] + 1) if changes else 0
        entry = {"step_s": start, "windows": len(phase), "decisions_settled_after_windows": settle,
                 "changes": len(changes), "bits": phase[-1]["next_bits"] if phase else None,
                 "decisions": [w["next_bits"] for w in phase],
                 "decisions_settle_s": round(phase[settle - 1]["t"] - t0 - start, 3) if settle else 0.0}
        if results is not None and target_rate:
            floor = floors[i] if floors else target_rate
            settle_s = output_settle(times, start, min(end, last), floor, slack_images=microbatch)
            entry.update(floor_rate=round(floor, 2), settle_s=settle_s,
                         settled_after_windows=(None if settle_s is None or not window_s
                                                else round(settle_s / window_s, 2)),
                         changes_after_settling=(None if settle_s is None else sum(
                             1 for j in changes if phase[j]["t"] - t0 > start + settle_s)))
        out.append(entry)
    return out


def summary(out_dir: Path, t0: float, elapsed: float) -> dict[str, Any]:
    """Images, errors, rate, latency percentiles and accuracy of a finished run."""
    results = read_jsonl(out_dir / "results.jsonl")
    labels = {r["id"]: r["label"] for r in read_jsonl(out_dir / "labels.jsonl")}
    ok = [r for r in results if "top5" in r]
    lat = sorted(r["latency_ms"] for r in ok)
    scored = [r for r in ok if labels.get(r["id"], -1) >= 0]

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else math.nan

    return {
        "images": len(results), "errors": len(results) - len(ok), "elapsed_s": round(elapsed, 3),
        "output_rate": round(len(results) / elapsed, 2) if elapsed > 0 else math.nan,
        "latency_ms_p50": pct(0.5), "latency_ms_p95": pct(0.95),
        "top1": round(sum(r["top5"][0][0] == labels[r["id"]] for r in scored) / len(scored), 4) if scored else None,
        "in_order": [r["id"] for r in results] == sorted(r["id"] for r in results),
    }
