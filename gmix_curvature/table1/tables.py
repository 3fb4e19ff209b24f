"""Table 1 as Markdown: the paper's layout with mean ± std over seeds, the curvature details, the stability
check, the comparisons paired by seed (difference, 95 % interval, d_z, Holm-adjusted p, the smallest difference
detectable with 80 % power) and the verdict on the paper's claims."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gmix_curvature.table1.methods import METHOD, PAPER_TABLE1
from gmix_curvature.table1.summary import PAIRED_METRICS

if TYPE_CHECKING:
    from gmix_curvature.table1.records import Table1Result
    from gmix_curvature.table1.stats import PairedDifference

__all__ = ["format_table1", "format_paired", "format_verdicts"]


def _cell(text: str) -> str:
    """Text for a Markdown table cell: its own pipes escaped."""
    return text.replace("|", "\\|")


def _num(x: float, fmt: str = "{:+.3g}") -> str:
    return fmt.format(x) if math.isfinite(x) else "—"


def format_paired(result: Table1Result) -> str:
    """The paired comparisons of ``result`` as a Markdown table, one line per (comparison, metric)."""
    names = {m.key: m.name for m in PAIRED_METRICS}
    n = max((c.n for c in result.comparisons), default=0)
    lines = [
        f"Paired by seed ({n} pairs; every row of one seed shares its initialisation and data order): "
        "difference row − reference with its 95 % confidence interval (paired t), Cohen's d_z = mean/sd of the "
        "differences, the paired t-test's p-value Holm-adjusted over the metrics of each comparison, and the "
        "smallest true difference the comparison detects with 80 % power at α = 0.05 (noncentral t, from the "
        "measured sd). ln: the difference of natural logs (ln of the ratio).",
        "",
        "| comparison | metric | difference [95 % CI] | d_z | Holm p | detectable (80 % power) | paper's difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.comparisons:
        label = f"{METHOD[c.row].label} − {METHOD[c.reference].label}" if c.row in METHOD else c.row
        ci = f"[{_num(c.ci_low)}, {_num(c.ci_high)}]" if math.isfinite(c.ci_low) else "(no interval)"
        name = _cell(names.get(c.metric, c.metric))
        lines.append(f"| {label} | {name} | {_num(c.mean)} {ci} | {_num(c.d_z, '{:+.2f}')} "
                     f"| {_num(c.p_holm, '{:.2g}')} | {_num(c.mde, '{:.3g}')} | {_paper_difference(c)} |")
    return "\n".join(lines)


def _paper_difference(c: PairedDifference) -> str:
    """The paper's difference for this comparison (|log Tr(G)| of Table 1 only) and whether the measured 95 %
    interval contains it; "—" where the paper gives none."""
    if c.metric not in ("abs_log_ggn_trace", "log_ggn_trace") or c.reference != "baseline" or c.row not in PAPER_TABLE1:
        return "—"
    delta = PAPER_TABLE1[c.row] - PAPER_TABLE1["baseline"]
    if not math.isfinite(c.ci_low):
        return f"{delta:+.2f} (no interval)"
    return f"{delta:+.2f}: " + ("inside the interval" if c.ci_low <= delta <= c.ci_high else "outside the interval")


def format_verdicts(result: Table1Result) -> str:
    """The verdict table of ``result`` (:mod:`gmix_curvature.table1.verdict`) as Markdown."""
    lines = [
        f"Verdict, preset {result.preset.name!r} (paired by seed; 95 % intervals; Holm-adjusted p < 0.05 counts "
        "as resolved):",
        "",
        "| claim | measured effect [95 % CI] | paper | verdict | why |",
        "|---|---|---|---|---|",
    ]
    for v in result.verdicts:
        paper = f"{v.paper:+.2f}" if v.paper is not None else "direction"
        lines.append(f"| {_cell(v.claim)} | {v.effect()} | {paper} | **{v.verdict}** | {_cell(v.reason)} |")
    return "\n".join(lines)


def format_table1(result: Table1Result) -> str:
    """The tables as Markdown: Table 1 in the paper's layout (plus accuracy and p-values), the curvature
    details, the stability check, the paired comparisons and the verdict."""
    p = result.preset
    mu = result.momentum
    thr = "2(1+μ)/η" if result.optimizer == "sgd" else "threshold"
    n = max((r.n for r in result.rows), default=0)
    head = [
        f"Table 1, preset {p.name!r}: {p.description}.",
        f"Mean ± std over {n} seeds; p: Welch's t-test against the SGD Baseline (unpaired; the comparisons paired "
        "by seed and the verdict follow). Curvature on the "
        f"{p.measure_split!r} split in eval mode; Tr = mean over samples (Eq. 5); log = natural log.",
        "",
        "| Method | batch | r = κ·B | test acc. (%) | \\|log Tr(G)\\| | log Tr(G) | paper's \\|log Tr(G)\\| |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        paper = f"{r.paper:.2f} (paper)" if r.paper is not None else "—"
        head.append(
            f"| {r.label} | {r.batch_size} | {r.kappa_ratio:g} | {r.cell('test_acc', p=True)} "
            f"| {r.cell('abs_log_ggn_trace', p=True)} | {r.cell('log_ggn_trace')} | {paper} |"
        )
    head += [
        "",
        "Curvature (measure split): Tr(G) exact, empirical Fisher, Hessian (Hutchinson, "
        f"{p.hessian_probes} probes), scale-invariant sharpness Σ‖θ_l‖²Tr(G_ll); Tr(G) @ L*: along training, "
        f"on {p.trace_samples} training images, where the training loss first reached L* = "
        + (f"{result.matched_loss:.4g}" if result.matched_loss is not None else "—")
        + " (the lowest loss every run reached).",
        "",
        "| Method | Tr(G) | Tr(EF) | Tr(H) | SI sharpness | ‖θ_SI‖² | Tr(G) @ L* |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        head.append(
            f"| {r.label} | {r.cell('ggn_trace', p=True)} | {r.cell('ef_trace', p=True)} "
            f"| {r.cell('hessian_trace', p=True)} | {r.cell('si_sharpness', p=True)} "
            f"| {r.cell('si_weight_norm2')} | {r.cell('ggn_trace_matched', p=True)} |"
        )
    head += [
        "",
        f"Stability (training split, eval mode): λ_max of G and of the Hessian at the end against the threshold "
        f"{thr} (μ = {mu:g}; stability_threshold) at the peak and at the final learning rate of the schedule; "
        "last column: the largest λ_max(G)/threshold(η_t) along training, η_t the rate of that step "
        "(1 = the edge of stability; BatchNorm in eval mode, so not exactly the sharpness a train-mode step sees).",
        "",
        f"| Method | train loss | λmax(G) | λmax(H) | η peak | {thr} at η peak | η final | {thr} at η final "
        "| max along training of λmax(G)/threshold(η_t) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        head.append(
            f"| {r.label} | {r.cell('train_loss', p=True)} | {r.cell('lambda_max_ggn', p=True)} "
            f"| {r.cell('lambda_max_hessian', p=True)} | {r.cell('lr_peak')} | {r.cell('threshold_peak')} "
            f"| {r.cell('lr_final')} | {r.cell('threshold_final')} | {r.cell('edge_ratio_max', p=True)} |"
        )
    if result.verdicts:
        head += ["", format_verdicts(result)]
    if result.comparisons:
        head += ["", format_paired(result)]
    return "\n".join(head)
