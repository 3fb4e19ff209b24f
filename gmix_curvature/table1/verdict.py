"""The verdict on the paper's claims, per benchmark: claim, measured effect with its interval, and whether the
claim holds, does not hold, or cannot be resolved at the power of the run — worded from the numbers alone.

A claim is a paired comparison (row − reference on one metric, :class:`~gmix_curvature.table1.stats.PairedDifference`)
with the direction the paper asserts and, where the paper gives one, its size. With the 95 % interval
[lo, hi] of the measured difference and "resolved" meaning Holm-adjusted p < 0.05:

* a claim with a size Δ (the paper's Table 1: |log Tr(G)| 5.87 → 4.21, Δ = −1.66, and → 4.58, Δ = −1.29):
  **holds** when Δ lies in [lo, hi] and the difference is resolved in Δ's direction; **does not hold** when
  Δ lies outside [lo, hi] (then the wording says whether the measured effect has Δ's direction but another
  size, or none); **not resolvable at this power** when [lo, hi] holds both Δ and 0;
* a claim of a direction only: **holds** when resolved in that direction, **does not hold** when resolved in
  the other, **not resolvable at this power** otherwise (the wording gives the smallest difference the run
  could detect with 80 % power).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gmix_curvature.table1.methods import PAPER_TABLE1
from gmix_curvature.table1.stats import PairedDifference

__all__ = ["Claim", "Verdict", "PAPER_CLAIMS", "judge", "judge_claims", "HOLDS", "FAILS", "UNRESOLVED"]

HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolvable at this power"
ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    """A claim to test: ``row`` − ``reference`` on ``metric`` has the sign of ``direction`` (−1 or +1) and, when
    ``size`` is given, that size (the paper's difference)."""

    text: str
    row: str
    reference: str
    metric: str
    direction: int
    size: float | None = None


PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim("a large batch lowers test accuracy (the benchmark's premise)", "baseline", "small_batch", "test_acc", -1),
    Claim("Gaussian GradientMix lowers |log Tr(G)| by the paper's 1.66 (5.87 → 4.21)", "gaussian", "baseline",
          "abs_log_ggn_trace", -1, round(PAPER_TABLE1["gaussian"] - PAPER_TABLE1["baseline"], 10)),
    Claim("Rademacher GradientMix lowers |log Tr(G)| by the paper's 1.29 (5.87 → 4.58)", "rademacher", "baseline",
          "abs_log_ggn_trace", -1, round(PAPER_TABLE1["rademacher"] - PAPER_TABLE1["baseline"], 10)),
    Claim("Gaussian GradientMix raises large-batch test accuracy", "gaussian", "baseline", "test_acc", +1),
    Claim("Rademacher GradientMix raises large-batch test accuracy", "rademacher", "baseline", "test_acc", +1),
)


@dataclass
class Verdict:
    """A :class:`Claim` judged: the measured difference, its 95 % interval, ``verdict`` (one of "holds",
    "does not hold", "not resolvable at this power") and ``reason`` in words."""

    claim: str
    row: str
    reference: str
    metric: str
    paper: float | None
    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_holm: float
    mde: float
    verdict: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def effect(self) -> str:
        """The measured effect with its interval, e.g. ``−0.41 [−0.62, −0.20]``."""
        if not math.isfinite(self.mean):
            return "—"
        if not math.isfinite(self.ci_low):
            return f"{self.mean:+.3g} (n = {self.n}, no interval)"
        return f"{self.mean:+.3g} [{self.ci_low:+.3g}, {self.ci_high:+.3g}]"


def _resolved(d: PairedDifference) -> bool:
    p = d.p_holm if math.isfinite(d.p_holm) else d.p_value
    return math.isfinite(p) and p < ALPHA


def judge(claim: Claim, d: PairedDifference) -> Verdict:
    """The verdict on ``claim`` from its measured paired difference ``d`` (module docstring for the rules).

    >>> from gmix_curvature.table1.stats import PairedDifference
    >>> d = PairedDifference("gaussian", "baseline", "abs_log_ggn_trace", 10, -1.5, 0.4, -1.79, -1.21, -11.9,
    ...                      1e-6, -3.7, 0.45, 1e-6)
    >>> judge(PAPER_CLAIMS[1], d).verdict
    'holds'
    """
    lo, hi, mean = d.ci_low, d.ci_high, d.mean
    base = dict(claim=claim.text, row=claim.row, reference=claim.reference, metric=claim.metric, paper=claim.size,
                n=d.n, mean=mean, ci_low=lo, ci_high=hi, p_holm=d.p_holm, mde=d.mde)
    interval = f"[{lo:+.3g}, {hi:+.3g}]"
    if d.n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return Verdict(**base, verdict=UNRESOLVED, reason=f"{d.n} paired seed(s): no interval")
    resolved = _resolved(d)
    sign = 1 if mean > 0 else -1 if mean < 0 else 0
    p_text = f"Holm p = {d.p_holm:.2g}" if math.isfinite(d.p_holm) else f"p = {d.p_value:.2g}"
    mde = f"the run detects (80 % power) differences of {d.mde:.3g} or more"
    if claim.size is not None:
        size = claim.size
        inside = lo <= size <= hi
        if inside and resolved and sign == claim.direction:
            return Verdict(**base, verdict=HOLDS, reason=f"the paper's {size:+.3g} lies inside the measured "
                           f"interval {interval}, which excludes 0 ({p_text})")
        if inside:
            return Verdict(**base, verdict=UNRESOLVED, reason=f"the interval {interval} holds both the paper's "
                           f"{size:+.3g} and 0; {mde}")
        if resolved and sign == claim.direction:
            how = "smaller" if abs(mean) < abs(size) else "larger"
            return Verdict(**base, verdict=FAILS, reason=f"the paper's direction, but {how}: the paper's {size:+.3g} "
                           f"lies outside the measured interval {interval} ({p_text})")
        if resolved:
            return Verdict(**base, verdict=FAILS, reason=f"the opposite direction: {interval} ({p_text}) excludes "
                           f"the paper's {size:+.3g} and 0")
        return Verdict(**base, verdict=FAILS, reason=f"no effect of the paper's size: the interval {interval} excludes "
                       f"the paper's {size:+.3g} (and holds 0)")
    if resolved and sign == claim.direction:
        return Verdict(**base, verdict=HOLDS, reason=f"resolved in the claimed direction: {interval} ({p_text})")
    if resolved:
        return Verdict(**base, verdict=FAILS, reason=f"resolved in the opposite direction: {interval} ({p_text})")
    return Verdict(**base, verdict=UNRESOLVED, reason=f"the interval {interval} holds 0 ({p_text}); {mde}")


def judge_claims(comparisons: Sequence[PairedDifference], claims: Sequence[Claim] = PAPER_CLAIMS) -> list[Verdict]:
    """:func:`judge` every claim whose comparison was measured (others are left out)."""
    found = {(c.row, c.reference, c.metric): c for c in comparisons}
    return [judge(cl, found[(cl.row, cl.reference, cl.metric)]) for cl in claims
            if (cl.row, cl.reference, cl.metric) in found]
