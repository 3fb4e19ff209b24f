"""Table 1's paired statistics (gmix_curvature.table1.stats) against scipy and by hand: the paired t-test and its
interval, Cohen's d_z, Holm's correction, and the power of the paired t-test (scipy's noncentral t) against a
simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gmix_curvature.table1.stats import holm, min_detectable_difference, paired_difference, paired_t_power

PAIRED_CASES = [
    pytest.param([5.9, 5.7, 6.1, 5.8], [4.3, 4.4, 4.0, 4.5], id="paper-sized-drop"),
    pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], [1.1, 1.8, 3.3, 3.9, 5.2], id="no-effect"),
    pytest.param([0.2, -0.1, 0.4], [0.0, 0.0, 0.0], id="three-pairs"),
    pytest.param([98.1, 97.9, 98.4, 98.0, 98.3, 97.7, 98.2, 98.0], [95.2, 96.1, 94.0, 95.5, 96.3, 93.9, 95.0, 95.8],
                 id="eight-seeds-accuracy"),
]


@pytest.mark.parametrize("a,b", PAIRED_CASES)
def test_paired_difference_matches_scipy_and_the_formulas(a, b):
    d = paired_difference(dict(enumerate(a)), dict(enumerate(b)), metric="m", names=("row", "ref"))
    ref = stats.ttest_rel(a, b)
    diff = np.asarray(a) - np.asarray(b)
    n, mean, sd = len(diff), diff.mean(), diff.std(ddof=1)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert (d.row, d.reference, d.metric, d.n) == ("row", "ref", "m", n)
    assert d.t == pytest.approx(ref.statistic, rel=1e-12) and d.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert d.mean == pytest.approx(mean, rel=1e-14) and d.sd == pytest.approx(sd, rel=1e-14)
    assert (d.ci_low, d.ci_high) == pytest.approx((mean - half, mean + half), rel=1e-12)
    assert d.d_z == pytest.approx(mean / sd, rel=1e-12)
    # the interval is the paired t-test inverted: it excludes 0 exactly when p < 0.05
    assert (d.ci_low > 0 or d.ci_high < 0) == (d.p_value < 0.05)
    assert d.mde == pytest.approx(min_detectable_difference(sd, n), rel=1e-12)


def test_paired_difference_pairs_by_seed_and_drops_missing_or_nonfinite():
    row = {0: 3.0, 1: 5.0, 2: float("nan"), 3: 7.0, 5: 1.0}
    ref = {0: 1.0, 1: 2.0, 2: 0.0, 3: 3.0, 4: 9.0}
    d = paired_difference(row, ref)
    assert d.n == 3 and d.mean == pytest.approx(3.0, rel=1e-15)  # seeds 0, 1, 3: differences 2, 3, 4
    assert d.p_value == pytest.approx(stats.ttest_rel([3.0, 5.0, 7.0], [1.0, 2.0, 3.0]).pvalue, rel=1e-12)
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.ci_low) and math.isnan(one.mde)
    assert paired_difference({}, {0: 1.0}).n == 0
    same = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # every difference 1: no spread
    assert (same.ci_low, same.ci_high, same.p_value, same.mde) == (1.0, 1.0, 0.0, 0.0)


HOLM_CASES = [
    pytest.param([0.01, 0.04, 0.03], [0.03, 0.06, 0.06], id="textbook"),
    pytest.param([0.001, 0.2, float("nan"), 0.012], [0.003, 0.2, float("nan"), 0.024], id="nan-not-counted"),
    pytest.param([0.5, 0.6], [1.0, 1.0], id="capped-at-1"),
    pytest.param([0.02], [0.02], id="single"),
]


@pytest.mark.parametrize("p,expected", HOLM_CASES)
def test_holm_by_hand(p, expected):
    got = holm(p)
    assert all((math.isnan(g) and math.isnan(e)) or g == pytest.approx(e, rel=1e-12) for g, e in zip(got, expected))


def test_holm_rejects_what_the_step_down_procedure_rejects():
    """Holm's procedure: sort p ascending, reject while p_(k) <= α/(m − k + 1), stop at the first failure."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 8))
        p = list(rng.uniform(0, 0.1, m) ** rng.uniform(0.5, 2))
        rejected_by_procedure = set()
        for k, i in enumerate(np.argsort(p)):
            if p[i] > 0.05 / (m - k):
                break
            rejected_by_procedure.add(int(i))
        assert {i for i, q in enumerate(holm(p)) if q <= 0.05} == rejected_by_procedure


@pytest.mark.parametrize("n", [2, 3, 8, 12])
def test_min_detectable_difference_inverts_the_power(n):
    mde = min_detectable_difference(0.3, n)
    assert paired_t_power(mde / 0.3, n) == pytest.approx(0.8, abs=1e-9)
    assert min_detectable_difference(0.6, n) == pytest.approx(2 * mde, rel=1e-9)
    assert paired_t_power(0.0, n) == pytest.approx(0.05, abs=1e-12)


def test_min_detectable_difference_shrinks_with_seeds():
    mdes = [min_detectable_difference(1.0, n) for n in (3, 5, 8, 12, 30)]
    assert all(a > b for a, b in zip(mdes, mdes[1:]))
    # large n: (z_0.975 + z_0.8)/√n
    assert min_detectable_difference(1.0, 400) == pytest.approx((1.959964 + 0.841621) / 20, rel=0.01)


@pytest.mark.montecarlo
@pytest.mark.parametrize("n,effect", [(2, 11.55), (3, 1.5), (8, 1.0), (10, 0.5), (12, 0.0)],
                         ids=["n2-mde", "n3", "n8", "n10-small-effect", "n12-null"])
def test_power_matches_a_simulation(n, effect):
    """The fraction of simulated experiments (n normal paired differences, mean = effect·sd) that the paired
    t-test rejects at 5 % equals paired_t_power within Z standard errors of the simulation."""
    z, reps = 4.0, 20_000
    rng = np.random.default_rng(1234 + n)
    d = rng.normal(effect, 1.0, size=(reps, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    expected = paired_t_power(effect, n)
    se = math.sqrt(expected * (1 - expected) / reps)
    assert abs(rejected - expected) < z * se, (rejected, expected, se)
