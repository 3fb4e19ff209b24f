"""Statistics of Table 1: per-row mean ± std, Welch's test, and the comparisons of rows paired by seed.

Every row of one seed starts from the same initialisation and sees the same data order (the training engine
seeds both from the seed alone), so a comparison of two rows is a paired one: the differences
d_s = x_s(row) − x_s(reference) over the seeds s both rows finished. For each:

* the paired t-test (``scipy.stats.ttest_rel``), t = d̄ / (s_d/√n) on n − 1 degrees of freedom, and the 95 %
  confidence interval d̄ ± t_{0.975, n−1} s_d/√n;
* the effect size Cohen's d_z = d̄ / s_d;
* Holm's step-down correction of the p-values over the metrics of one comparison (:func:`holm`);
* the smallest difference the comparison could detect with 80 % power at α = 0.05 two-sided
  (:func:`min_detectable_difference`): δ·s_d where δ solves power(δ) = 0.8 for the noncentral t with
  noncentrality δ√n (``scipy.stats.nct``) — computed with the measured s_d, so itself an estimate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "welch_p_value",
    "mean_std",
    "PairedDifference",
    "paired_difference",
    "holm",
    "paired_t_power",
    "min_detectable_difference",
]


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) of the means of ``a`` and ``b``; NaN with fewer
    than two finite values in either, or when both have zero spread.

    >>> round(welch_p_value([1.0, 2.0, 3.0], [4.0, 5.0, 6.5]), 4)  # t = -3.41 on 3.8 degrees of freedom
    0.0291
    >>> welch_p_value([1.0], [2.0, 3.0])
    nan
    """
    from scipy import stats

    a = np.asarray([v for v in a if math.isfinite(v)], dtype=np.float64)
    b = np.asarray([v for v in b if math.isfinite(v)], dtype=np.float64)
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, std with ddof 1, n) of the finite values; NaN where undefined.

    >>> mean_std([1.0, 3.0, float("nan")])
    (2.0, 1.4142135623730951, 2)
    """
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
    return mean, std, len(v)


def paired_t_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs at level ``alpha`` when the true mean difference is
    ``effect`` standard deviations of the differences: P(|T| > t_{1−α/2, n−1}) for T noncentral t with n − 1
    degrees of freedom and noncentrality effect·√n.

    >>> round(paired_t_power(0.0, 10), 12)  # no effect: the test's level
    0.05
    >>> round(paired_t_power(1.0, 10), 3)
    0.803
    >>> round(paired_t_power(11.53, 2), 2)  # one degree of freedom: nct's tails by integration
    0.8
    """
    from scipy import stats

    if n < 2:
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect * math.sqrt(n)
    power = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if not math.isfinite(power):  # scipy's nct loses its tails for few degrees of freedom and a large nc
        from scipy import integrate

        # T = (Z + nc)/S with S = sqrt(χ²_df/df): P(|T| > c) = E_S[Φ(nc − cS) + Φ(−nc − cS)]
        def integrand(s: float) -> float:
            return float((stats.norm.cdf(nc - crit * s) + stats.norm.cdf(-nc - crit * s))
                         * stats.chi.pdf(s * math.sqrt(df), df) * math.sqrt(df))

        power = float(integrate.quad(integrand, 0.0, math.inf, limit=200)[0])
    return power


def min_detectable_difference(sd: float, n: int, *, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference a two-sided paired t-test with ``n`` pairs detects with probability
    ``power`` at level ``alpha``, for differences of standard deviation ``sd``: δ·sd with
    :func:`paired_t_power` (δ, n, α) = power. NaN for n < 2 or an undefined sd.

    >>> round(min_detectable_difference(1.0, 10), 3)  # about (t_crit + z_0.8)/√n ≈ 0.99
    0.996
    >>> round(min_detectable_difference(0.2, 3), 3)
    0.653
    """
    from scipy import optimize

    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    hi = 1.0
    while paired_t_power(hi, n, alpha) < power:
        hi *= 2
    delta = optimize.brentq(lambda d: paired_t_power(d, n, alpha) - power, 0.0, hi, xtol=1e-12)
    return float(delta * sd)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count): the k-th smallest of m
    p-values becomes max over j ≤ k of min(1, (m − j + 1) p_(j)).

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    idx = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    m = len(order)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = round(running, 15)
    return out


@dataclass
class PairedDifference:
    """One paired comparison of a metric: ``row`` − ``reference`` over the seeds both finished.

    ``mean`` and ``sd`` of the differences, ``n`` pairs, the 95 % interval [``ci_low``, ``ci_high``], the paired
    t statistic and its two-sided ``p_value``, ``p_holm`` (filled in over the metrics of one comparison),
    Cohen's ``d_z`` and the minimal difference detectable with 80 % power, ``mde``."""

    row: str
    reference: str
    metric: str
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    d_z: float
    mde: float
    p_holm: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(
    row: Mapping[int, float], reference: Mapping[int, float], *, metric: str = "", names: tuple[str, str] = ("", ""),
    confidence: float = 0.95,
) -> PairedDifference:
    """Paired comparison of two rows by seed: ``row`` and ``reference`` map a seed to the metric's value; seeds
    missing from either, or non-finite in either, are left out. See the module docstring for the quantities.

    >>> d = paired_difference({0: 2.0, 1: 3.0, 2: 5.0}, {0: 1.0, 1: 1.5, 2: 2.0})
    >>> d.n, d.mean, round(d.p_value, 4), round(d.ci_low, 3), round(d.ci_high, 3)
    (3, 1.8333333333333333, 0.0927, -0.752, 4.419)
    """
    from scipy import stats

    seeds = sorted(s for s in row if s in reference and math.isfinite(row[s]) and math.isfinite(reference[s]))
    a = np.array([row[s] for s in seeds], dtype=np.float64)
    b = np.array([reference[s] for s in seeds], dtype=np.float64)
    d = a - b
    n = len(d)
    nan = math.nan
    if n == 0:
        return PairedDifference(names[0], names[1], metric, 0, nan, nan, nan, nan, nan, nan, nan, nan)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(names[0], names[1], metric, n, mean, nan, nan, nan, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
        return PairedDifference(names[0], names[1], metric, n, mean, 0.0, mean, mean,
                                nan if mean == 0 else math.copysign(math.inf, mean), p, nan, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = stats.ttest_rel(a, b)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(
        names[0], names[1], metric, n, mean, sd, mean - half, mean + half, float(test.statistic),
        float(test.pvalue), mean / sd, min_detectable_difference(sd, n),
    )
