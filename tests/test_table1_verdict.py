"""The verdict table's wording follows the numbers: constructed paired results — an interval that contains the
paper's difference, one that excludes it, one too wide — and the direction-only claims."""

from __future__ import annotations

import math

import pytest

from gmix_curvature.table1 import (
    PAPER_CLAIMS,
    PAPER_TABLE1,
    Claim,
    PairedDifference,
    Table1Result,
    judge,
    judge_claims,
    table1_preset,
)
from gmix_curvature.table1.tables import format_paired, format_verdicts
from gmix_curvature.table1.verdict import FAILS, HOLDS, UNRESOLVED

GAUSSIAN = PAPER_CLAIMS[1]


def measured(mean, lo, hi, p_holm, *, mde=0.5, n=10, row="gaussian", metric="abs_log_ggn_trace"):
    return PairedDifference(row, "baseline", metric, n, mean, 0.4, lo, hi, mean / 0.13, p_holm, mean / 0.4, mde, p_holm)


VERDICT_CASES = [
    # (difference, verdict, words the reason must contain)
    pytest.param(measured(-1.5, -1.8, -1.2, 1e-6), HOLDS, ["-1.66 lies inside", "excludes 0"], id="contains-paper"),
    pytest.param(measured(-0.3, -0.45, -0.15, 0.004), FAILS, ["direction, but smaller", "-1.66 lies outside"],
                 id="excludes-paper-smaller"),
    pytest.param(measured(-2.6, -2.9, -2.3, 1e-7), FAILS, ["direction, but larger"], id="excludes-paper-larger"),
    pytest.param(measured(0.4, 0.2, 0.6, 0.002), FAILS, ["opposite direction"], id="opposite-sign"),
    pytest.param(measured(0.05, -0.2, 0.3, 0.6), FAILS, ["no effect of the paper's size", "holds 0"],
                 id="tight-around-zero"),
    pytest.param(measured(-0.9, -2.4, 0.6, 0.2, mde=2.1), UNRESOLVED, ["holds both the paper's -1.66 and 0",
                 "detects (80 % power) differences of 2.1"], id="too-wide"),
    pytest.param(measured(-1.6, math.nan, math.nan, math.nan, n=1), UNRESOLVED, ["1 paired seed"], id="one-seed"),
]


@pytest.mark.parametrize("d,verdict,words", VERDICT_CASES)
def test_sized_claim_wording_follows_the_numbers(d, verdict, words):
    v = judge(GAUSSIAN, d)
    assert v.verdict == verdict, v.reason
    for w in words:
        assert w in v.reason, (w, v.reason)
    assert (v.paper, v.mean, v.ci_low, v.ci_high) == (-1.66, d.mean, d.ci_low, d.ci_high)


def test_holm_decides_when_the_raw_interval_excludes_zero():
    # raw interval just excludes 0 and holds the paper's value, but after Holm it is not resolved
    d = measured(-1.0, -1.9, -0.05, 0.09)
    assert judge(GAUSSIAN, d).verdict == UNRESOLVED


DIRECTION = Claim("mixing raises accuracy", "gaussian", "baseline", "test_acc", +1)


@pytest.mark.parametrize(
    "d,verdict,words",
    [
        pytest.param(measured(1.2, 0.4, 2.0, 0.01, metric="test_acc"), HOLDS, ["claimed direction"], id="up"),
        pytest.param(measured(-1.2, -2.0, -0.4, 0.01, metric="test_acc"), FAILS, ["opposite direction"], id="down"),
        pytest.param(measured(0.3, -0.9, 1.5, 0.6, mde=1.4, metric="test_acc"), UNRESOLVED,
                     ["holds 0", "differences of 1.4 or more"], id="unresolved"),
    ],
)
def test_direction_claim_wording(d, verdict, words):
    v = judge(DIRECTION, d)
    assert v.verdict == verdict and v.paper is None
    assert all(w in v.reason for w in words), v.reason


def test_paper_claims_use_the_papers_table_and_the_table_prints_them():
    sizes = {c.row: c.size for c in PAPER_CLAIMS if c.size is not None}
    assert sizes == {"gaussian": pytest.approx(4.21 - 5.87, abs=1e-12), "rademacher": pytest.approx(4.58 - 5.87,
                                                                                                      abs=1e-12)}
    assert PAPER_TABLE1["baseline"] == 5.87
    comparisons = [measured(-1.5, -1.8, -1.2, 1e-6), measured(-0.1, -0.9, 0.7, 0.8, row="rademacher"),
                   measured(-3.0, -4.0, -2.0, 1e-4, metric="test_acc")]
    comparisons[2].row, comparisons[2].reference = "baseline", "small_batch"
    verdicts = judge_claims(comparisons)
    assert [v.verdict for v in verdicts] == [HOLDS, HOLDS, FAILS]  # premise, Gaussian, Rademacher (−1.29 outside)
    result = Table1Result(table1_preset("micro"), {}, None, [], [], None, 0.9, "sgd", verdicts=verdicts)
    text = format_verdicts(result)
    premise = "| a large batch lowers test accuracy (the benchmark's premise) | -3 [-4, -2] | direction | **holds** |"
    assert premise in text
    assert "-1.5 [-1.8, -1.2] | -1.66 | **holds**" in text and "**does not hold**" in text
    # the paired table says, per metric the paper has, whether its difference lies inside the interval
    result.comparisons = comparisons
    paired = format_paired(result).splitlines()
    assert [line.rsplit("| ", 1)[-1].rstrip(" |") for line in paired[-3:]] == [
        "-1.66: inside the interval", "-1.29: outside the interval", "—"]
