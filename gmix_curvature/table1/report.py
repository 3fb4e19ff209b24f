"""Writing a Table 1 run to disk: Markdown, JSON, CSVs (summary, per run, paired comparisons, verdicts) and the
figures (:mod:`gmix_curvature.table1.plots`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from gmix_curvature.table1.plots import plot_table1, plot_trace_vs_loss
from gmix_curvature.table1.records import Table1Result

__all__ = ["write_table1"]


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    return x


def write_table1(result: Table1Result, out: str | Path, *, plot: bool = True) -> dict[str, str]:
    """Write ``table1.md`` (the printed tables), ``table1.json`` (everything; NaN/inf as null),
    ``table1.csv`` (one line per method and metric: mean, std, n, Welch p, the paper's value),
    ``runs.csv`` (one line per run), ``paired.csv`` (one line per paired comparison and metric: difference, 95 %
    interval, t, p, Holm p, d_z, the difference detectable with 80 % power), ``verdict.csv`` (one line per claim)
    and, with ``plot``, ``table1.png`` and ``trace_vs_loss.png``
    (:func:`plot_table1`, :func:`plot_trace_vs_loss`). Returns {kind: path}; also stored in ``result.files``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "table1.md", "json": out / "table1.json", "csv": out / "table1.csv",
             "runs_csv": out / "runs.csv"}
    text = result.format_table()
    if result.selection is not None:
        text += "\n\n" + result.selection.format_table()
    files["markdown"].write_text(text + "\n")
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "label", "batch_size", "kappa_ratio", "metric", "mean", "std", "n", "p_value_vs_baseline",
                    "paper"])
        for r in result.rows:
            for key, s in r.stats.items():
                paper = r.paper if key == "abs_log_ggn_trace" and r.paper is not None else ""
                w.writerow([r.method, r.label, r.batch_size, r.kappa_ratio, key, s["mean"], s["std"], s["n"],
                            s["p_value"], paper])
    keys = sorted({k for r in result.runs for k in r.metrics})
    with open(files["runs_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "batch_size", "noise", "kappa_ratio", "kappa", "steps", "out", *keys])
        for r in result.runs:
            w.writerow([r.method, r.seed, r.batch_size, r.noise, r.kappa_ratio, r.kappa, r.steps, r.out or "",
                        *[r.metrics.get(k, math.nan) for k in keys]])
    files["paired_csv"], files["verdict_csv"] = out / "paired.csv", out / "verdict.csv"
    for path, items in ((files["paired_csv"], result.comparisons), (files["verdict_csv"], result.verdicts)):
        dicts = [c.to_dict() for c in items]
        with open(path, "w", newline="") as f:
            if dicts:
                w = csv.DictWriter(f, fieldnames=list(dicts[0]))
                w.writeheader()
                w.writerows(dicts)
    if plot:
        files["figure"] = plot_table1(result, out / "table1.png")
        if any(r.trace for r in result.runs):
            files["trace_figure"] = plot_trace_vs_loss(result, out / "trace_vs_loss.png")
    result.files = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(_finite_or_none(result.to_dict()), indent=2) + "\n")
    return result.files


