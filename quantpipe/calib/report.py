"""The accuracy report of ``quantpipe evaluate``: Markdown tables shaped like the paper's Table 1, CSV
files, a JSON dump and a PNG plot of accuracy against bitwidth per method.

Accuracies are percentages. "drop" is fp32 top-1 minus the method's top-1 (points, positive = worse);
"agreement" is the share of images whose top-1 class equals the unquantized pipeline's.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AccuracyRow", "MseRow", "EvalResult", "TARGET_DROP", "markdown_report", "write_reports"]

#: targets.md section 1: allowed top-1 drop (points) versus fp32, by bitwidth.
TARGET_DROP: dict[int, float] = {8: 0.2, 6: 0.5, 4: 1.0, 3: 4.0, 2: 10.0}


@dataclass(frozen=True)
class AccuracyRow:
    """Accuracy of one method at one bitwidth (both boundaries quantized). Percentages; None if unlabelled."""

    method: str
    bits: int
    top1: float | None
    top5: float | None
    agreement: float
    n: int


@dataclass(frozen=True)
class MseRow:
    """Quantization MSE of one method at one boundary and bitwidth, on the unquantized boundary tensor.

    ``rel_mse`` divides by the tensor's mean square, so boundaries of different scale compare.
    """

    boundary: int
    method: str
    bits: int
    mse: float
    rel_mse: float


@dataclass
class EvalResult:
    """Everything ``quantpipe evaluate`` measured."""

    fp32_top1: float | None
    fp32_top5: float | None
    n: int
    rows: list[AccuracyRow]
    mse: list[MseRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str, bits: int) -> AccuracyRow | None:
        return next((r for r in self.rows if r.method == method and r.bits == bits), None)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))

    @property
    def bits(self) -> list[int]:
        return sorted({r.bits for r in self.rows}, reverse=True)

    def drop(self, row: AccuracyRow) -> float | None:
        if row.top1 is None or self.fp32_top1 is None:
            return None
        return self.fp32_top1 - row.top1


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _metric_table(result: EvalResult, cell) -> list[str]:
    bits = result.bits
    header = ["method"] + [f"{b} bit" if b != 32 else "32 (fp32)" for b in bits]
    rows = []
    for m in result.methods:
        cells = [m]
        for b in bits:
            r = result.row(m, b)
            cells.append("-" if r is None else cell(r))
        rows.append(cells)
    return _table(header, rows)


def _targets_table(result: EvalResult) -> list[str]:
    """Best method per target bitwidth versus the targets.md drop limits."""
    rows = []
    for bits, limit in sorted(TARGET_DROP.items(), reverse=True):
        candidates = [r for r in result.rows if r.bits == bits and r.top1 is not None]
        if not candidates or result.fp32_top1 is None:
            continue
        best = max(candidates, key=lambda r: (r.top1, r.agreement))
        drop = result.drop(best)
        verdict = "met" if drop <= limit + 1e-9 else f"missed by {drop - limit:.2f}"
        rows.append([f"{bits}", best.method, _pct(best.top1), _pct(drop), f"<= {limit:g}", verdict])
    return _table(["bits", "best method", "top-1", "drop", "target drop", "verdict"], rows) if rows else []


def _mse_tables(result: EvalResult) -> list[str]:
    lines: list[str] = []
    for boundary in sorted({r.boundary for r in result.mse}):
        rows_b = [r for r in result.mse if r.boundary == boundary]
        bits = sorted({r.bits for r in rows_b}, reverse=True)
        methods = list(dict.fromkeys(r.method for r in rows_b))
        get = {(r.method, r.bits): r for r in rows_b}
        lines += ["", f"Boundary {boundary}: quantization MSE relative to the tensor's mean square "
                  "(lower is better)", ""]
        body = [[m] + [f"{get[(m, b)].rel_mse:.3e}" if (m, b) in get else "-" for b in bits] for m in methods]
        if all((name, b) in get for name in ("aciq", "ds_aciq") for b in bits):
            body.append(["**ds_aciq / aciq**"] + [
                f"{get[('ds_aciq', b)].mse / get[('aciq', b)].mse:.2f}" if get[("aciq", b)].mse > 0 else "-" for b in bits])
        lines += _table(["method"] + [f"{b} bit" for b in bits], body)
    return lines


def markdown_report(result: EvalResult) -> str:
    """The whole report as Markdown."""
    meta = result.meta
    out = ["# quantpipe evaluate", ""]
    for key in ("model", "split", "stages", "table", "table_digest", "dataset", "calibration", "command"):
        if key in meta:
            out.append(f"- {key}: `{meta[key]}`")
    out += [f"- images evaluated: {result.n}",
            f"- fp32 pipeline: top-1 {_pct(result.fp32_top1)}, top-5 {_pct(result.fp32_top5)}", ""]
    if result.fp32_top1 is not None:
        out += ["## Top-1 accuracy (%) per method and bitwidth (both boundaries quantized)", ""]
        out += _metric_table(result, lambda r: _pct(r.top1))
        out += ["", "## Top-1 drop versus fp32 (points)", ""]
        out += _metric_table(result, lambda r: _pct(result.drop(r)))
        out += ["", "## Top-5 accuracy (%)", ""]
        out += _metric_table(result, lambda r: _pct(r.top5))
    out += ["", "## Top-1 agreement with the unquantized pipeline (%)", ""]
    out += _metric_table(result, lambda r: _pct(r.agreement))
    targets = _targets_table(result)
    if targets:
        out += ["", "## Targets (targets.md section 1): best method per bitwidth", ""] + targets
    if result.mse:
        out += ["", "## Clipping + rounding MSE on the evaluation images' fp32 boundary tensors"] + _mse_tables(result)
    return "\n".join(out) + "\n"


def _plot(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on devices and CI
    import matplotlib.pyplot as plt

    use_top1 = result.fp32_top1 is not None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bits = [b for b in result.bits if b != 32]
    for m in result.methods:
        pts = [(b, r.top1 if use_top1 else r.agreement) for b in bits if (r := result.row(m, b)) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    if use_top1:
        ax.axhline(result.fp32_top1, color="black", linestyle="--", linewidth=1, label="fp32")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bits)
    ax.set_xticklabels([str(b) for b in bits])
    ax.set_xlabel("bits per boundary value")
    ax.set_ylabel("top-1 accuracy (%)" if use_top1 else "top-1 agreement with fp32 (%)")
    ax.set_title(f"{result.meta.get('model', '')} split {result.meta.get('split', '')}: {result.n} images")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """Write accuracy.csv, mse.csv, report.md, results.json and accuracy.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc_csv = out / "accuracy.csv"
    with acc_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "bits", "top1", "top5", "agreement", "drop", "n"])
        w.writerow(["fp32", 32, _pct(result.fp32_top1, 4), _pct(result.fp32_top5, 4), "100.0000", "0.0000", result.n])
        for r in result.rows:
            w.writerow([r.method, r.bits, _pct(r.top1, 4), _pct(r.top5, 4), _pct(r.agreement, 4),
                        _pct(result.drop(r), 4), r.n])
    mse_csv = out / "mse.csv"
    with mse_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["boundary", "method", "bits", "mse", "rel_mse"])
        for m in result.mse:
            w.writerow([m.boundary, m.method, m.bits, f"{m.mse:.6e}", f"{m.rel_mse:.6e}"])
    md = out / "report.md"
    md.write_text(markdown_report(result))
    js = out / "results.json"
    js.write_text(json.dumps({"fp32_top1": result.fp32_top1, "fp32_top5": result.fp32_top5, "n": result.n,
                              "meta": result.meta, "rows": [asdict(r) for r in result.rows],
                              "mse": [asdict(m) for m in result.mse]}, indent=1, default=str) + "\n")
    png = out / "accuracy.png"
    _plot(result, png)
    return [acc_csv, mse_csv, md, js, png]
