"""From the runs to the table: per-row summaries (:func:`summarise`) and the comparisons of rows paired by seed
(:func:`paired_comparisons`, the quantities of :mod:`gmix_curvature.table1.stats`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gmix_curvature.table1.methods import METHOD, PAPER_TABLE1, TABLE1_METHODS
from gmix_curvature.table1.records import RunRecord, Table1Row
from gmix_curvature.table1.stats import PairedDifference, holm, mean_std, paired_difference, welch_p_value

__all__ = ["summarise", "PairedMetric", "PAIRED_METRICS", "COMPARISONS", "paired_comparisons"]


@dataclass(frozen=True)
class PairedMetric:
    """A metric compared by seed: ``key`` of :attr:`RunRecord.metrics`, on the natural-log scale when ``log``
    (the difference is then ln of the ratio; for positive, scale-like quantities), its printed ``name``."""

    key: str
    name: str
    log: bool = False

    def value(self, metrics: Mapping[str, float]) -> float:
        v = float(metrics.get(self.key, math.nan))
        if self.log:
            return math.log(v) if v > 0 else math.nan
        return v


# The family of metrics each comparison tests (Holm's correction runs over these): the paper's quantity, the
# accuracy, and the confounders this project measures (training loss, BatchNorm-fed weights, scale-free
# sharpness, Tr(G) at matched training loss).
PAIRED_METRICS: tuple[PairedMetric, ...] = (
    PairedMetric("abs_log_ggn_trace", "|log Tr(G)|"),
    PairedMetric("test_acc", "test acc. (%)"),
    PairedMetric("train_loss", "ln train loss", log=True),
    PairedMetric("si_weight_norm2", "ln ‖θ_SI‖²", log=True),
    PairedMetric("si_sharpness", "ln SI sharpness", log=True),
    PairedMetric("ggn_trace_matched", "ln Tr(G) @ L*", log=True),
)

# (row, reference): the large batch against the small one, and each noise kind against the averaging baseline
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("baseline", "small_batch"),
    ("gaussian", "baseline"),
    ("rademacher", "baseline"),
)


def summarise(runs: Sequence[RunRecord], kappa_ratios: Mapping[str, float]) -> list[Table1Row]:
    """One :class:`Table1Row` per method present in ``runs``, in the order of :data:`TABLE1_METHODS`:
    mean, std (ddof 1) and n over seeds for every metric, and Welch's p-value against the baseline's runs.

    >>> runs = [RunRecord("baseline", s, 8, "none", 0.0, 0.0, 1, None, {"ggn_trace": 1.0 + s}) for s in range(3)]
    >>> runs += [RunRecord("gaussian", s, 8, "gaussian", 1.0, 0.1, 1, None, {"ggn_trace": 5.0 + s}) for s in range(3)]
    >>> rows = summarise(runs, {"gaussian": 1.0})
    >>> [r.method for r in rows], rows[1].stats["ggn_trace"]["mean"], round(rows[1].stats["ggn_trace"]["p_value"], 4)
    (['baseline', 'gaussian'], 6.0, 0.008)
    """
    by_method: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    base = by_method.get("baseline", [])
    keys = sorted({k for r in runs for k in r.metrics})
    rows = []
    for method in TABLE1_METHODS:
        mine = by_method.get(method.key)
        if not mine:
            continue
        stats = {}
        for k in keys:
            vals = [r.metrics.get(k, math.nan) for r in mine]
            mean, std, n = mean_std(vals)
            p = math.nan
            if method.key != "baseline" and base:
                p = welch_p_value(vals, [r.metrics.get(k, math.nan) for r in base])
            stats[k] = {"mean": mean, "std": std, "n": n, "p_value": p}
        rows.append(
            Table1Row(
                method=method.key,
                label=method.label,
                batch_size=mine[0].batch_size,
                kappa_ratio=float(kappa_ratios.get(method.noise, 0.0)) if method.noise != "none" else 0.0,
                n=len(mine),
                stats=stats,
                paper=PAPER_TABLE1.get(method.key),
            )
        )
    return rows


def paired_comparisons(
    runs: Sequence[RunRecord],
    comparisons: Sequence[tuple[str, str]] = COMPARISONS,
    metrics: Sequence[PairedMetric] = PAIRED_METRICS,
) -> list[PairedDifference]:
    """For each (row, reference) of ``comparisons`` whose rows both ran, and each metric of ``metrics``, the
    paired difference row − reference over the seeds both finished (:func:`paired_difference`); the p-values of
    one comparison are Holm-adjusted over its metrics (``p_holm``).

    >>> runs = [RunRecord(m, s, 8, "none", 0.0, 0.0, 1, None, {"test_acc": v + s})
    ...         for m, v in (("baseline", 90.0), ("gaussian", 91.0)) for s in range(3)]
    >>> [(c.row, c.reference, c.metric, c.mean) for c in paired_comparisons(runs, metrics=PAIRED_METRICS[1:2])]
    [('gaussian', 'baseline', 'test_acc', 1.0)]
    """
    by: dict[str, dict[int, RunRecord]] = {}
    for r in runs:
        by.setdefault(r.method, {})[r.seed] = r
    out: list[PairedDifference] = []
    for row, ref in comparisons:
        if row not in by or ref not in by or row not in METHOD or ref not in METHOD:
            continue
        family = [
            paired_difference({s: m.value(r.metrics) for s, r in by[row].items()},
                              {s: m.value(r.metrics) for s, r in by[ref].items()}, metric=m.key, names=(row, ref))
            for m in metrics
        ]
        for c, p in zip(family, holm([c.p_value for c in family]), strict=True):
            c.p_holm = p
        out += family
    return out
