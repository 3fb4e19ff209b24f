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

__all__ = ["write_table1", "load_table1"]


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




def _nan_for_none(d: dict[str, Any]) -> dict[str, float]:
    return {k: (math.nan if v is None else v) for k, v in d.items()}


def load_table1(path: str | Path, *, write: bool = False, plot: bool = True) -> Table1Result:
    """A finished Table 1 read back from its ``table1.json`` (or the directory holding it), with the summary rows,
    the paired comparisons and the verdicts computed afresh from the runs it recorded — no training, no
    measurement. ``write`` writes the tables, CSVs and figures again next to the file (:func:`write_table1`).

    >>> import tempfile
    >>> from gmix_curvature.table1.presets import table1_preset
    >>> from gmix_curvature.table1.records import RunRecord
    >>> runs = [RunRecord(m, s, 8, "none", 0.0, 0.0, 1, None, {"test_acc": 90.0 + s + (m == "gaussian")})
    ...         for m in ("baseline", "gaussian") for s in range(3)]
    >>> res = Table1Result(table1_preset("micro"), {"gaussian": 1.0}, None, runs, [], None, 0.9, "sgd")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = write_table1(res, d, plot=False)
    ...     again = load_table1(d)
    >>> [(c.row, c.metric, c.mean) for c in again.comparisons if c.metric == "test_acc"]
    [('gaussian', 'test_acc', 1.0)]
    """
    from gmix_curvature.table1.presets import Table1Preset
    from gmix_curvature.table1.records import KappaSelection, RunRecord, Table1Samples
    from gmix_curvature.table1.summary import paired_comparisons, summarise
    from gmix_curvature.table1.verdict import judge_claims

    path = Path(path)
    if path.is_dir():
        path = path / "table1.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a table1.json written by gmix table1)")
    d = json.loads(path.read_text())
    pd = dict(d["preset"])
    for key in ("kappa_sweep", "select_splits", "methods"):
        pd[key] = tuple(pd.get(key) or ())
    preset = Table1Preset(**pd)
    runs = []
    for r in d["runs"]:
        r = dict(r)
        r["metrics"] = _nan_for_none(r.get("metrics", {}))
        r["trace"] = [_nan_for_none(t) for t in r.get("trace", [])]
        runs.append(RunRecord(**r))
    sel = d.get("selection")
    selection = None
    if sel:
        selection = KappaSelection(sel["rule"], tuple(sel["splits"]), sel["batch_size"], tuple(sel["candidates"]),
                                   sel["scores"], sel["chosen"])
    ratios = {k: float(v) for k, v in d.get("kappa_ratios", {}).items()}
    comparisons = paired_comparisons(runs)
    result = Table1Result(
        preset=preset, kappa_ratios=ratios, selection=selection, runs=runs, rows=summarise(runs, ratios),
        matched_loss=d.get("matched_loss"), momentum=float(d.get("momentum", math.nan)),
        optimizer=str(d.get("optimizer", "")), out=path.parent, seconds=float(d.get("seconds") or 0.0),
        samples={k: Table1Samples.from_dict(v) for k, v in (d.get("samples") or {}).items()},
        data_dir=d.get("data_dir"), comparisons=comparisons, verdicts=judge_claims(comparisons),
    )
    if write:
        write_table1(result, path.parent, plot=plot)
    return result
