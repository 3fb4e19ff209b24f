"""The κ dose-response of GradientMix (issue 16, items 3 and 4): how test accuracy, curvature and its confounders
move with the mixing strength r = κ·B (Eq. 12 with κ in units of the mean weight 1/B; γ̄ = 1 + r², Theorem 1),
per noise kind, with 95 % confidence bands over seeds — and one controlled check of the routes by which mixing
could lower Tr(G).

It is a sweep (:mod:`gmix_curvature.sweep`): the presets ``dose_mnist1d`` and ``dose_digits`` define the grid
(:func:`dose_grid`: the averaging baseline r = 0 once, Gaussian and Rademacher weights at r > 0, a weight-decay
axis, seeds), :func:`train_and_measure` runs one cell (train, recording Tr(G) and the training loss along
training, then :func:`gmix_curvature.table1.measure_run` on the test split in eval mode) and
:func:`write_dose_response` turns the finished cells into ``dose_response.csv`` and ``dose_response.png``.

Metrics (:data:`DOSE_METRICS`): test accuracy (%), ln Tr(G) (Eq. 5, mean over the test samples), ln of the
scale-invariant sharpness Σ_l ‖θ_l‖² Tr(G_ll) over the BatchNorm-fed weight groups, ‖θ‖² of those groups, ln Tr(G)
at a training loss L* that every run of the same weight decay reached (:func:`gmix_curvature.table1.
matched_loss_trace`: the along-training records, on a fixed subset of training samples), and ln of the final
training loss (eval mode, whole training split). Positive quantities spanning decades are summarised in logs,
so that their intervals and differences are ratios.

The routes. A lower Tr(G) with mixing can come from (a) larger BatchNorm-fed weights — for a scale-invariant group
Tr(G_ll) ∝ 1/‖θ_l‖², and weight decay sets ‖θ‖ by balancing the gradient noise that mixing raises; (b) training
less far — G depends on the loss reached; or (c) a flatter function. The scale-invariant sharpness removes (a)
exactly (it is invariant to rescaling each group), the matched-loss trace removes (b), and the weight-decay axis
is the controlled check: at weight decay 0 the norms are not set by the noise/decay balance, so if the effect on
ln Tr(G) is a norm effect it should change there, while a flatter function should not. Every difference is paired
by seed against the baseline of the same weight decay (runs of one seed share initialisation and data order).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gmix_curvature.errors import GmixError

__all__ = [
    "DOSE_RATIOS",
    "DOSE_NOISES",
    "DOSE_METRICS",
    "DoseMetric",
    "DoseRun",
    "dose_grid",
    "train_and_measure",
    "t_interval",
    "paired_mde",
    "summarise_dose",
    "write_dose_response",
    "plot_dose_response",
]

DOSE_RATIOS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
DOSE_NOISES: tuple[str, ...] = ("gaussian", "rademacher")
TRACE_POINTS = 8  # along-training records per run (each an exact Tr(G) on trace_samples training samples)


@dataclass(frozen=True)
class DoseMetric:
    """A column of the dose-response: ``key`` in the CSV, the run's measured ``source``, whether it is logged, and
    ``paired_base``: the run's own column holding the baseline's value to pair it with (None: the baseline run's
    ``source`` of the same seed)."""

    key: str
    source: str
    label: str
    log: bool
    paired_base: str | None = None


DOSE_METRICS: tuple[DoseMetric, ...] = (
    DoseMetric("test_acc", "test_acc", "test accuracy (%)", False),
    DoseMetric("log_ggn_trace", "ggn_trace", "ln Tr(G), test", True),
    DoseMetric("log_si_sharpness", "si_sharpness", "ln SI sharpness Σ‖θ_l‖²Tr(G_ll)", True),
    DoseMetric("si_weight_norm2", "si_weight_norm2", "‖θ‖² of BatchNorm-fed weights", False),
    DoseMetric("log_ggn_trace_matched", "ggn_trace_matched", "Δ ln Tr(G) vs r = 0 at matched train loss L*(r)", True,
               paired_base="ggn_trace_matched_base"),
    DoseMetric("log_train_loss", "train_loss", "ln final training loss", True),
)


@dataclass
class DoseRun:
    """What :func:`train_and_measure` returns to the sweep: the steps and the measured columns (``final``)."""

    steps: int
    final: dict[str, Any]


def _mix_entry(noise: str, r: float) -> dict[str, Any]:
    if r == 0:
        return {"label": "none", "noise": "none", "kappa_ratio": None}
    return {"label": f"{noise}-r{r:g}", "noise": noise, "kappa_ratio": float(r)}


def dose_grid(
    ratios: Sequence[float] = DOSE_RATIOS,
    noises: Sequence[str] = DOSE_NOISES,
    seeds: int | Sequence[int] = 3,
    weight_decay: float = 5e-4,
    control_weight_decays: Sequence[float] = (0.0,),
    control_ratios: Sequence[float] | None = None,
) -> list[dict[str, list[Any]]]:
    """The sweep grid of a dose-response, seed by seed (a sweep cut short leaves whole seeds): axes ``seed``,
    ``weight_decay`` and ``mix`` — the baseline ``none`` for r = 0 (once) and ``<noise>-r<r>`` for each noise kind
    and r > 0 of ``ratios`` at ``weight_decay``; the route check repeats ``control_ratios`` (default: all) at each
    of ``control_weight_decays``.

    >>> g = dose_grid(ratios=(0, 2), noises=("gaussian", "rademacher"), seeds=2, control_ratios=(0, 2))
    >>> [m["label"] for m in g[0]["mix"]], [(x["seed"], x["weight_decay"]) for x in g]
    (['none', 'gaussian-r2', 'rademacher-r2'], [([0], [0.0005]), ([0], [0.0]), ([1], [0.0005]), ([1], [0.0])])
    """
    def mix(rs: Sequence[float]) -> list[dict[str, Any]]:
        if any(not r >= 0 for r in rs):
            raise GmixError(f"the ratios r = κ·B must be >= 0, got {list(rs)}")
        head = [_mix_entry("none", 0.0)] if 0 in rs else []
        return head + [_mix_entry(noise, float(r)) for noise in noises for r in rs if r != 0]

    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    grids = []
    for s in seed_list:
        grids.append({"seed": [s], "weight_decay": [float(weight_decay)], "mix": mix(ratios)})
        if control_weight_decays:
            grids.append({"seed": [s], "weight_decay": [float(w) for w in control_weight_decays],
                          "mix": mix(ratios if control_ratios is None else control_ratios)})  # fmt: skip
    return grids


def train_and_measure(
    config: Any, *, resume: bool = False, datasets: tuple[Any, Any] | None = None, trust: bool = False
) -> DoseRun:
    """One cell of a dose-response sweep: train ``config`` (recording Tr(G) and the loss ``TRACE_POINTS`` times
    along training when its ``trace_every`` is 0), then measure the trained model in eval mode with
    :func:`gmix_curvature.table1.measure_run` — on the eval split (test accuracy, exact Tr(G), scale-invariant
    sharpness and ‖θ‖² of the BatchNorm-fed groups) and the whole training split (final training loss); no
    Hessian probes, no λ_max; measured in float64 (the presets' models have < 10⁵ weights). A
    :class:`~gmix_curvature.sweep` ``CELL``.
    """
    import torch

    from gmix_curvature.data import load_dataset
    from gmix_curvature.table1 import measure_run
    from gmix_curvature.train import resolve_config, train

    if datasets is None:
        datasets = (
            load_dataset(config.data, config.train_split, config.data_dir),
            load_dataset(config.data, config.eval_split, config.data_dir),
        )
    train_ds, eval_ds = datasets
    if not config.trace_every:
        steps = int(resolve_config(config, len(train_ds)).steps)
        config = dataclasses.replace(config, trace_every=max(1, steps // TRACE_POINTS), trace_method="exact")
    res = train(config, resume=resume, datasets=(train_ds, eval_ds), trust=trust)
    m = measure_run(res.model, res.config, measure_data=eval_ds, train_data=train_ds, eigen_data=eval_ds,
                    hessian_probes=0, eigen=False, dtype=torch.float64)  # fmt: skip
    r = float(res.config.kappa_ratio or 0.0)
    keep = ("test_acc", "test_loss", "ggn_trace", "log_ggn_trace", "si_sharpness", "si_weight_norm2", "ef_trace",
            "train_loss", "train_acc", "lr_peak")  # fmt: skip
    final = {"data": res.config.data, "model": res.config.model, "noise": res.config.noise, "r": r,
             "gamma_bar": 1.0 + r * r, "batch_size": res.config.batch_size, **{k: m[k] for k in keep}}  # fmt: skip
    return DoseRun(steps=int(res.steps), final=final)


# ------------------------------------------------------------------------------------------------ statistics


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float, int]:
    """Mean, sample standard deviation and the two-sided Student-t confidence interval of the mean, over the
    finite ``values``: mean ± t_{(1+level)/2, n−1} · sd/√n. (nan, nan, nan, nan, n) for fewer than two.

    >>> mean, sd, lo, hi, n = t_interval([1.0, 2.0, 3.0])
    >>> mean, sd, round(lo, 4), round(hi, 4), n  # t_{0.975, 2} = 4.3027
    (2.0, 1.0, -0.4841, 4.4841, 3)
    """
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan, n
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half, n


def paired_mde(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at ``1 − level`` detects with probability
    ``power`` from ``n`` pairs whose differences have standard deviation ``sd``: δ·sd with δ solving
    P(T' > t_{(1+level)/2, n−1}) = power for T' noncentral t with n − 1 degrees of freedom and noncentrality
    δ√n (the far tail is negligible). NaN for n < 2 or a non-finite sd.

    >>> round(paired_mde(1.0, 4), 3), round(paired_mde(1.0, 8), 3)
    (2.128, 1.156)
    """
    from scipy import optimize, stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    crit = float(stats.t.ppf((1 + level) / 2, n - 1))
    delta = optimize.brentq(lambda d: stats.nct.sf(crit, n - 1, d * math.sqrt(n)) - power, 1e-6, 100.0)
    return float(delta * sd)


def _value(row: Mapping[str, Any], metric: DoseMetric) -> float:
    x = row.get(metric.source)
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return math.nan
    x = float(x)
    if metric.log:
        return math.log(x) if x > 0 else math.nan
    return x


def _read_trace(cell_dir: Path) -> list[dict[str, float]]:
    """The along-training records of a cell (:func:`gmix_curvature.table1.measure.read_trace`), as floats."""
    from gmix_curvature.table1.measure import read_trace

    return [{k: float(v) for k, v in rec.items()} for rec in read_trace(str(cell_dir))]


def _with_matched_loss(runs: list[dict[str, Any]], out: Path | None) -> list[dict[str, Any]]:
    """Add Tr(G) at a matched training loss to every run (:func:`gmix_curvature.table1.matched_loss_trace` on the
    along-training records, read from ``out/<cell>/metrics.jsonl``, or a run's ``trace`` when ``out`` is None).

    Per weight decay and arm: L*(arm) is the highest of the lowest losses reached by the arm's runs and the
    baseline's (r = 0) runs, so each arm is compared with the baseline at a loss both reached — one common L*
    for the whole grid would be set by the strongest mixing, which stops far above the others. Each run gets
    ``matched_loss`` = L*(arm), ``ggn_trace_matched`` (its Tr(G) there) and ``ggn_trace_matched_base`` (the
    baseline run of its seed at the same L*); the baseline's own runs are matched among themselves. Diverged
    runs take no part.
    """
    from gmix_curvature.table1 import matched_loss_trace

    def trace(r: Mapping[str, Any]) -> list[dict[str, float]]:
        if r.get("diverged"):
            return []
        return _read_trace(out / r["cell"]) if out is not None else list(r.get("trace", []))

    traces = [trace(r) for r in runs]
    for wd in sorted({r.get("weight_decay") for r in runs}, key=str):
        group = [i for i, r in enumerate(runs) if r.get("weight_decay") == wd]
        base = [i for i in group if runs[i]["noise"] == "none"]
        for arm in sorted({(runs[i]["noise"], float(runs[i]["r"])) for i in group}):
            mine = [i for i in group if (runs[i]["noise"], float(runs[i]["r"])) == arm]
            pool = mine if arm[0] == "none" else mine + base
            level, at = matched_loss_trace({i: traces[i] for i in pool})
            for i in mine:
                r = runs[i]
                r["matched_loss"] = level if level is not None else math.nan
                r["ggn_trace_matched"] = at.get(i, math.nan)
                twin = [b for b in base if runs[b]["seed"] == r["seed"]]
                r["ggn_trace_matched_base"] = at.get(twin[0], math.nan) if twin else math.nan
    return runs


def summarise_dose(runs: Sequence[Mapping[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """The dose-response table, one row per (weight decay, noise kind, r, metric): over seeds, n, mean, sd and the
    ``level`` t-interval of the mean; and the difference from the r = 0 baseline of the same weight decay, paired
    by seed (mean, its t-interval, n pairs, sd, and ``diff_mde80``: the difference :func:`paired_mde` detects
    with 80 % power at this n and sd). The baseline appears under noise ``"none"``.

    ``runs`` are per-run dicts with ``weight_decay``, ``noise``, ``r``, ``seed`` and the sources of
    :data:`DOSE_METRICS`; a diverged run (``diverged`` set) counts as missing in every metric.

    >>> runs = [{"weight_decay": 0.0, "noise": n, "r": r, "seed": s, "test_acc": a + s}
    ...         for (n, r, a) in (("none", 0.0, 90.0), ("gaussian", 1.0, 92.0)) for s in range(3)]
    >>> row = [x for x in summarise_dose(runs) if x["noise"] == "gaussian" and x["metric"] == "test_acc"][0]
    >>> row["mean"], row["diff_mean"], row["diff_n"], row["diff_ci_low"] == row["diff_ci_high"] == 2.0
    (93.0, 2.0, 3, True)
    """
    out: list[dict[str, Any]] = []
    arms = sorted({(r["weight_decay"], r["noise"], float(r["r"])) for r in runs},
                  key=lambda a: (-a[0], a[1] != "none", a[1], a[2]))  # fmt: skip
    for wd, noise, ratio in arms:
        mine = [r for r in runs if (r["weight_decay"], r["noise"], float(r["r"])) == (wd, noise, ratio)]
        base = {r["seed"]: r for r in runs if r["weight_decay"] == wd and r["noise"] == "none"}
        for metric in DOSE_METRICS:
            vals = [math.nan if r.get("diverged") else _value(r, metric) for r in mine]
            mean, sd, lo, hi, n = t_interval(vals, level)
            if metric.paired_base is not None:  # the baseline's value is held by the run itself
                base_of = {r["seed"]: _value(r, dataclasses.replace(metric, source=metric.paired_base)) for r in mine}
            else:
                base_of = {s: math.nan if b.get("diverged") else _value(b, metric) for s, b in base.items()}
            diffs = [(math.nan if r.get("diverged") else _value(r, metric)) - base_of.get(r["seed"], math.nan)
                     for r in mine]  # fmt: skip
            d_mean, d_sd, d_lo, d_hi, d_n = t_interval(diffs, level) if noise != "none" else (math.nan,) * 4 + (0,)
            out.append({
                "weight_decay": wd, "noise": noise, "r": ratio, "gamma_bar": 1 + ratio**2, "metric": metric.key,
                "n": n, "runs": len(mine), "mean": mean, "sd": sd, "ci_low": lo, "ci_high": hi,
                "diff_mean": d_mean, "diff_ci_low": d_lo, "diff_ci_high": d_hi, "diff_n": d_n, "diff_sd": d_sd,
                "diff_mde80": paired_mde(d_sd, d_n, level),
                "matched_loss": t_interval([r.get("matched_loss", math.nan) for r in mine])[0]
                if metric.paired_base else math.nan,
            })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- the report


def write_dose_response(csv: str | Path, out: str | Path) -> Path:
    """The sweep's REPORT: from its ``results.csv`` (and each cell's along-training records under ``out``) write
    ``dose_runs.csv`` (per run, with Tr(G) at the matched loss), ``dose_response.csv`` (:func:`summarise_dose`)
    and ``dose_response.png`` (:func:`plot_dose_response`); returns the figure's path."""
    import pandas as pd

    out = Path(out)
    df = pd.read_csv(csv)
    need = {"cell", "weight_decay", "seed", "noise", "r"}
    if not need <= set(df.columns):
        raise GmixError(f"{csv} is not a dose-response sweep: it lacks {', '.join(sorted(need - set(df.columns)))}")
    runs = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in df.to_dict("records")]  # fmt: skip
    for r in runs:  # a diverged cell has no measured columns; its arm comes from its cell's labels
        if r.get("diverged") and (r.get("noise") is None or r.get("r") is None):
            entry = str(r.get("mix", "none"))
            r["noise"], _, ratio = entry.partition("-r")
            r["r"] = float(ratio or 0.0)
    runs = _with_matched_loss(runs, out)
    pd.DataFrame(runs).to_csv(out / "dose_runs.csv", index=False)
    table = pd.DataFrame(summarise_dose(runs))
    table.to_csv(out / "dose_response.csv", index=False)
    return plot_dose_response(table, out / "dose_response.png", data=str(df.get("data", pd.Series([""])).iloc[0]))


def plot_dose_response(table: Any, path: str | Path, *, data: str = "") -> Path:
    """One panel per metric (columns) and weight decay (rows): the mean over seeds against r = κ·B, one line per
    noise kind with its 95 % confidence band, and the r = 0 baseline as a dotted line with its band; for Tr(G) at
    the matched loss, whose level L*(r) differs per arm, the difference from the baseline paired by seed (its
    band: the paired interval; the baseline: 0). Drawn on a :class:`matplotlib.figure.Figure` (matplotlib's
    global state is left alone)."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    table = pd.DataFrame(table)
    wds = sorted(table["weight_decay"].unique(), reverse=True)
    colours = dict(zip(DOSE_NOISES, sns.color_palette("deep", 3)[:2]))
    with sns.axes_style("darkgrid"):
        fig = Figure(figsize=(2.9 * len(DOSE_METRICS), 2.6 * len(wds) + 0.5), layout="constrained")
        axes = fig.subplots(len(wds), len(DOSE_METRICS), squeeze=False, sharex=True)
        for i, wd in enumerate(wds):
            for j, metric in enumerate(DOSE_METRICS):
                ax = axes[i][j]
                sub = table[(table["weight_decay"] == wd) & (table["metric"] == metric.key)]
                base = sub[sub["noise"] == "none"]
                cols = ("mean", "ci_low", "ci_high")
                if metric.paired_base is not None:  # differences from the baseline, each at its own L*(r)
                    cols = ("diff_mean", "diff_ci_low", "diff_ci_high")
                    base = base.assign(diff_mean=0.0, diff_ci_low=math.nan, diff_ci_high=math.nan)
                if len(base):
                    b = base.iloc[0]
                    ax.axhline(b[cols[0]], color="0.3", ls=":", lw=1.2, label="r = 0 baseline")
                    if math.isfinite(b[cols[1]]):
                        ax.axhspan(b[cols[1]], b[cols[2]], color="0.5", alpha=0.15, lw=0)
                for noise in DOSE_NOISES:
                    line = pd.concat([base, sub[sub["noise"] == noise]]).sort_values("r")
                    if len(line) <= len(base):
                        continue
                    ax.plot(line["r"], line[cols[0]], marker="o", ms=3.5, color=colours[noise], label=noise)
                    ax.fill_between(line["r"], line[cols[1]], line[cols[2]], color=colours[noise], alpha=0.2, lw=0)
                ax.set_title(metric.label if i == 0 else "", fontsize=9)
                ax.set_ylabel(f"weight decay {wd:g}" if j == 0 else "", fontsize=9)
                ax.tick_params(labelsize=8)
                if i == len(wds) - 1:
                    ax.set_xlabel("r = κ·B  (γ̄ = 1 + r²)", fontsize=9)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
        title = "GradientMix dose-response" + (f" on {data}" if data else "")
        fig.suptitle(f"{title}: mean over seeds, 95 % t-interval bands", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
