"""Figures of Table 1, drawn on :class:`matplotlib.figure.Figure` objects (matplotlib's backend and pyplot's
figures are left alone): :func:`plot_table1` (the paired differences beside the paper's, the table's
quantities per method) and :func:`plot_trace_vs_loss` (curvature along training against the training loss)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gmix_curvature.table1.methods import PAPER_TABLE1, TABLE1_METHODS
from gmix_curvature.table1.records import Table1Result

__all__ = ["plot_table1", "plot_trace_vs_loss"]


def plot_table1(result: Table1Result, path: str | Path) -> Path:
    """Four panels: the comparison a reader looks for first — the paired difference of |log Tr(G)| of each
    noise kind against the baseline (mean over seeds, 95 % interval) beside the paper's difference (black
    diamonds, −1.66 and −1.29) — then grouped bars with error bars (std over seeds) of |log Tr(G)| beside the
    paper's values (diamonds), test accuracy, and the log₁₀ of every curvature quantity, one bar per method.
    Legends sit below the panels, clear of the data."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    labels = {m.key: m.label for m in TABLE1_METHODS}
    rows = []
    logs = {"ggn_trace": "Tr(G)", "ef_trace": "Tr(EF)", "hessian_trace": "Tr(H)", "si_sharpness": "SI sharp.",
            "lambda_max_ggn": "λmax(G)", "lambda_max_hessian": "λmax(H)"}
    for r in result.runs:
        for key, name in logs.items():
            v = r.metrics.get(key, math.nan)
            rows.append({"method": labels[r.method], "quantity": name,
                         "value": math.log10(v) if v > 0 else math.nan})
    df = pd.DataFrame(rows)
    runs = pd.DataFrame([{"method": labels[r.method], **r.metrics} for r in result.runs])
    order = [labels[m.key] for m in TABLE1_METHODS if labels[m.key] in set(runs["method"])]
    colours = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    fig = Figure(figsize=(18, 5.2))
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [0.8, 1, 1, 2.6]})
    paper_handle = Line2D([], [], marker="D", color="black", linestyle="none",
                          label="paper (ResNet-18, CIFAR-10, batch 8K)")
    # panel 0: paired differences against the baseline, with the paper's
    diffs = [c for c in result.comparisons if c.reference == "baseline" and c.metric == "abs_log_ggn_trace"]
    ax = axes[0]
    for i, c in enumerate(diffs):
        colour = colours.get(labels[c.row], "grey")
        if math.isfinite(c.ci_low):
            ax.errorbar(i, c.mean, yerr=[[c.mean - c.ci_low], [c.ci_high - c.mean]], fmt="o", color=colour,
                        capsize=6, markersize=7)
        else:
            ax.plot(i, c.mean, "o", color=colour)
        if c.row in PAPER_TABLE1:
            ax.plot(i + 0.15, PAPER_TABLE1[c.row] - PAPER_TABLE1["baseline"], marker="D", color="black",
                    linestyle="none")
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set_xticks(range(len(diffs)), [labels[c.row].replace("SGD + ", "") for c in diffs], fontsize=7,
                  rotation=30, ha="right")
    ax.set_xlim(-0.6, max(len(diffs), 1) - 0.4)
    ax.set(ylabel="Δ|ln Tr(G)| vs baseline", title="paired Δ (95 % CI) vs paper's Δ")
    # panel 1: |log Tr(G)| per method, the paper's values as diamonds
    sns.barplot(data=runs, x="method", y="abs_log_ggn_trace", order=order, errorbar="sd", ax=axes[1],
                hue="method", hue_order=order, palette=colours, legend=False)
    for i, name in enumerate(order):
        key = next(m.key for m in TABLE1_METHODS if m.label == name)
        if key in PAPER_TABLE1:
            axes[1].plot(i, PAPER_TABLE1[key], marker="D", color="black", linestyle="none")
    top = max([float(np.nanmax(runs["abs_log_ggn_trace"])) if len(runs) else 0.0, *PAPER_TABLE1.values()])
    axes[1].set(ylabel="|ln Tr(G)|", xlabel="", title="Table 1: |log Tr(G)|", ylim=(0, 1.1 * top))
    sns.barplot(data=runs, x="method", y="test_acc", order=order, errorbar="sd", ax=axes[2], hue="method",
                hue_order=order, palette=colours, legend=False)
    lo = float(np.nanmin(runs["test_acc"])) if len(runs) else 0.0
    axes[2].set(ylabel="test accuracy (%)", xlabel="", title="accuracy", ylim=(max(0.0, lo - 5), 100))
    for ax in axes[1:3]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    sns.barplot(data=df, x="quantity", y="value", hue="method", hue_order=order, palette=colours, errorbar="sd",
                ax=axes[3], legend=False)
    axes[3].set(ylabel="log₁₀ value", xlabel="", title="curvature (mean ± std over seeds)")
    handles = [Line2D([], [], marker="s", color=colours[name], linestyle="none", markersize=9, label=name)
               for name in order] + [paper_handle]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"Table 1, preset {result.preset.name!r}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_trace_vs_loss(result: Table1Result, path: str | Path) -> Path:
    """Along training (the engine's ``trace`` records, on a fixed training subset in eval mode), against the
    training loss: Tr(G), λ_max(G), and λ_max(G) over the stability threshold at the learning rate of that
    step (1 = the edge of stability). One line per run, one colour per method; the dashed line marks the
    matched loss L*. Drawn on a :class:`matplotlib.figure.Figure`, as :func:`plot_table1`."""
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    labels = {m.key: m.label for m in TABLE1_METHODS}
    palette = dict(zip([m.key for m in TABLE1_METHODS], sns.color_palette(n_colors=len(TABLE1_METHODS))))
    fig = Figure(figsize=(17, 4.6))
    axes = fig.subplots(1, 3)
    seen: set[str] = set()
    for r in result.runs:
        recs = [t for t in r.trace if t.get("loss", 0) > 0 and t.get("ggn_trace", 0) > 0]
        if not recs:
            continue
        loss = [t["loss"] for t in recs]
        label = labels[r.method] if r.method not in seen else None
        seen.add(r.method)
        style = {"marker": ".", "color": palette[r.method], "label": label, "alpha": 0.8}
        axes[0].plot(loss, [t["ggn_trace"] for t in recs], **style)
        axes[1].plot(loss, [t.get("top_eigenvalue", math.nan) for t in recs], **style)
        axes[2].plot(loss, [t.get("edge_ratio", math.nan) for t in recs], **style)
    axes[2].axhline(1.0, color="black", linestyle=":", linewidth=1)
    axes[2].set_ylim(bottom=1e-2)  # below 1 % of the threshold (warmup start, end of the decay): not informative
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()
        ax.set_xlabel("training loss (fixed training subset, eval mode) → training goes on")
        if result.matched_loss is not None:
            ax.axvline(result.matched_loss, color="grey", linestyle="--", linewidth=1)
    axes[0].set(ylabel="Tr(G)", title="Tr(G) along training (dashed: matched loss L*)")
    axes[1].set(ylabel="λmax(G)", title="top eigenvalue of G")
    axes[2].set(ylabel="λmax(G) · η_t / 2(1+μ)", title="λmax(G) over the threshold at the step's LR (1: edge)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
