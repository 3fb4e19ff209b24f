"""The κ dose-response: its grid, its statistics against scipy, matched-loss traces per weight decay, and the
sweep preset writing its figure and CSV at micro size."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gmix_curvature.data import load_dataset
from gmix_curvature.dose_response import (
    DOSE_METRICS,
    _with_matched_loss,
    dose_grid,
    paired_mde,
    summarise_dose,
    t_interval,
    write_dose_response,
)
from gmix_curvature.errors import GmixError
from gmix_curvature.sweep import grid_cells, preset_grid, run_sweep
from gmix_curvature.train import TrainConfig


def test_dose_grid_cells():
    cells = grid_cells(dose_grid(ratios=(0, 0.5, 4), seeds=2, control_ratios=(0, 4)))
    names = [c.name for c in cells]
    assert names[:5] == [
        "seed=0_weight_decay=0.0005_mix=none", "seed=0_weight_decay=0.0005_mix=gaussian-r0.5",
        "seed=0_weight_decay=0.0005_mix=gaussian-r4", "seed=0_weight_decay=0.0005_mix=rademacher-r0.5",
        "seed=0_weight_decay=0.0005_mix=rademacher-r4",
    ]  # fmt: skip
    assert len(cells) == 2 * (5 + 3) and names[5] == "seed=0_weight_decay=0_mix=none"
    c = cells[2]
    assert c.overrides == {"seed": 0, "weight_decay": 5e-4, "noise": "gaussian", "kappa_ratio": 4.0}
    assert cells[0].overrides["noise"] == "none" and cells[0].overrides["kappa_ratio"] is None
    with pytest.raises(GmixError, match="must be >= 0"):
        dose_grid(ratios=(0, -1))


@pytest.mark.parametrize("name", ["dose_digits", "dose_mnist1d"])
def test_dose_presets_are_valid_sweeps(name):
    preset, grid = preset_grid(name)
    cells = grid_cells(grid)
    for cell in cells:
        TrainConfig.from_dict({**preset, **cell.overrides})
    arms = {(c.overrides["weight_decay"], c.labels["mix"]) for c in cells}
    assert (5e-4, "none") in arms and (0.0, "none") in arms and (5e-4, "rademacher-r4") in arms
    assert len({c.labels["seed"] for c in cells}) >= 3


def test_t_interval_matches_scipy():
    values = [0.3, 1.9, 1.1, 0.7, 2.4]
    mean, sd, lo, hi, n = t_interval(values + [math.nan])
    want = stats.t.interval(0.95, 4, loc=sum(values) / 5, scale=stats.sem(values))
    assert (lo, hi) == pytest.approx(want, rel=1e-12) and n == 5 and sd == pytest.approx(stats.tstd(values))
    assert math.isnan(t_interval([1.0])[2]) and t_interval([])[4] == 0


@pytest.mark.montecarlo
def test_paired_mde_has_its_power_in_simulation():
    """Paired t-tests at the returned difference reject in 80 % of 20,000 simulated experiments (n = 4 pairs),
    within 4 standard errors (0.0113); half the difference rejects far less often."""
    rng = np.random.default_rng(0)
    sd, n, sims = 0.3, 4, 20_000
    for scale, want in ((1.0, 0.8), (0.5, None)):
        d = rng.normal(scale * paired_mde(sd, n), sd, size=(sims, n))
        p = stats.ttest_1samp(d, 0.0, axis=1).pvalue
        rate = float(np.mean(p < 0.05))
        if want is not None:
            assert abs(rate - want) < 4 * math.sqrt(want * (1 - want) / sims)
        else:
            assert rate < 0.45
    assert math.isnan(paired_mde(1.0, 1)) and paired_mde(2.0, 6) == pytest.approx(2 * paired_mde(1.0, 6))


def _runs():
    """Baseline and Gaussian r = 2 at two weight decays, 4 seeds, hand-made values; one Gaussian run diverged."""
    base = {"ggn_trace": [300.0, 250.0, 280.0, 320.0], "test_acc": [92.0, 93.5, 91.0, 92.5]}
    mixed = {"ggn_trace": [80.0, 90.0, 60.0, 75.0], "test_acc": [93.0, 93.0, 92.5, 94.0]}
    runs = []
    for wd in (5e-4, 0.0):
        for seed in range(4):
            runs.append({"weight_decay": wd, "noise": "none", "r": 0.0, "seed": seed,
                         **{k: v[seed] * (1 + wd) for k, v in base.items()}})  # fmt: skip
            runs.append({"weight_decay": wd, "noise": "gaussian", "r": 2.0, "seed": seed,
                         **{k: v[seed] for k, v in mixed.items()}})  # fmt: skip
    runs[-1] = {**runs[-1], "diverged": "non-finite loss", "ggn_trace": None, "test_acc": None}
    return runs


def test_summary_pairs_by_seed_like_scipy():
    table = pd.DataFrame(summarise_dose(_runs()))
    assert len(table) == 2 * 2 * len(DOSE_METRICS)
    row = table[(table.weight_decay == 5e-4) & (table.noise == "gaussian") & (table.metric == "log_ggn_trace")].iloc[0]
    a = [math.log(v) for v in (80.0, 90.0, 60.0, 75.0)]
    b = [math.log(v * (1 + 5e-4)) for v in (300.0, 250.0, 280.0, 320.0)]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (row.diff_ci_low, row.diff_ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert row["mean"] == pytest.approx(sum(a) / 4, rel=1e-12) and row.gamma_bar == 5.0 and row.n == 4
    # the diverged run (weight decay 0, seed 3) is missing from the mean and from the pairs
    row = table[(table.weight_decay == 0.0) & (table.noise == "gaussian") & (table.metric == "test_acc")].iloc[0]
    assert (row.n, row.runs, row.diff_n) == (3, 4, 3)
    ci = stats.ttest_rel([93.0, 93.0, 92.5], [92.0, 93.5, 91.0]).confidence_interval(0.95)
    assert (row.diff_ci_low, row.diff_ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert table[table.noise == "none"].diff_mean.isna().all()
    assert row.diff_mde80 == pytest.approx(paired_mde(row.diff_sd, 3), rel=1e-12) and row.diff_sd > 0


def test_matched_loss_per_arm_against_its_baseline():
    fast = [{"loss": 2.0, "ggn_trace": 1.0}, {"loss": 0.5, "ggn_trace": 4.0}]
    slow = [{"loss": 2.0, "ggn_trace": 2.0}, {"loss": 1.0, "ggn_trace": 8.0}]
    lower = [{"loss": 2.0, "ggn_trace": 1.0}, {"loss": 0.25, "ggn_trace": 3.0}]

    def run(wd, noise, r, seed, trace, **kw):
        return {"cell": f"{wd}-{noise}-{seed}", "weight_decay": wd, "noise": noise, "r": r, "seed": seed,
                "trace": trace, **kw}  # fmt: skip

    runs = _with_matched_loss([
        run(5e-4, "none", 0.0, 0, fast), run(5e-4, "none", 0.0, 1, lower), run(5e-4, "gaussian", 2.0, 0, slow),
        run(5e-4, "gaussian", 4.0, 0, slow, diverged="nan"), run(0.0, "none", 0.0, 0, fast),
        run(0.0, "gaussian", 2.0, 0, []),
    ], None)  # fmt: skip
    base0, base1, mixed, diverged, base_wd0, untraced = runs
    # the Gaussian arm: L* = 1.0 (its lowest loss); baseline seed 0 crosses it halfway in log loss: Tr(G) = 2
    assert mixed["matched_loss"] == 1.0 and mixed["ggn_trace_matched"] == pytest.approx(8.0, rel=1e-12)
    assert mixed["ggn_trace_matched_base"] == pytest.approx(2.0, rel=1e-12)
    # the baselines among themselves: L* = 0.5, seed 1 interpolated between (2, 1) and (0.25, 3)
    assert base0["matched_loss"] == base1["matched_loss"] == 0.5
    assert base0["ggn_trace_matched"] == pytest.approx(4.0, rel=1e-12)
    assert base1["ggn_trace_matched"] == pytest.approx(math.exp(math.log(3.0) * 2 / 3), rel=1e-12)
    assert math.isnan(diverged["ggn_trace_matched"]) and math.isnan(untraced["ggn_trace_matched"])
    assert base_wd0["matched_loss"] == 0.5  # weight decays are matched separately
    row = next(x for x in summarise_dose(runs) if x["metric"] == "log_ggn_trace_matched" and x["r"] == 2.0
               and x["weight_decay"] == 5e-4)  # fmt: skip
    assert row["diff_mean"] == pytest.approx(math.log(8.0 / 2.0), rel=1e-12) and row["matched_loss"] == 1.0


def test_report_from_a_results_csv(tmp_path, matplotlib_state_kept):
    rows = []
    for r in _runs():
        mix = "none" if r["noise"] == "none" else f"gaussian-r{r['r']:g}"
        row = {"cell": f"seed={r['seed']}_weight_decay={r['weight_decay']:g}_mix={mix}", "mix": mix, **r,
               "si_sharpness": 3.0, "si_weight_norm2": 10.0 + r["seed"], "train_loss": 0.01, "data": "digits"}
        if r.get("diverged"):
            row = {k: row[k] for k in ("cell", "mix", "weight_decay", "seed", "diverged")}
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    with matplotlib_state_kept():
        fig = write_dose_response(tmp_path / "results.csv", tmp_path)
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = pd.read_csv(tmp_path / "dose_runs.csv")
    assert runs[runs.diverged.notna()][["noise", "r"]].values.tolist() == [["gaussian", 2.0]]
    table = pd.read_csv(tmp_path / "dose_response.csv")
    assert set(table.metric) == {m.key for m in DOSE_METRICS} and len(table) == 4 * len(DOSE_METRICS)
    pd.DataFrame([{"cell": "x", "seed": 0}]).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(GmixError, match="not a dose-response sweep: it lacks noise, r, weight_decay"):
        write_dose_response(tmp_path / "other.csv", tmp_path)


def test_dose_sweep_micro_writes_figure_and_csv(tmp_path):
    """The preset end to end with the real engine and measurements, shrunk: 2 steps, width 4, 128 training and
    64 test digits, 2 seeds x (baseline, Gaussian r = 2), two along-training records per run."""
    grid = dose_grid(ratios=(0, 2), noises=("gaussian",), seeds=2, control_weight_decays=())
    data = (load_dataset("digits", "train").subset(128), load_dataset("digits", "test").subset(64))
    small = {"epochs": None, "steps": 2, "warmup_epochs": 0, "model_kwargs": {"width": 4}, "trace_samples": 32,
             "trace_every": 2}  # fmt: skip
    res = run_sweep("dose_digits", out=tmp_path, grid=grid, overrides=small, datasets=data)
    assert len(res.ran) == 4 and res.figure == tmp_path / "dose_response.png" and res.figure.stat().st_size > 1000
    runs = pd.read_csv(tmp_path / "dose_runs.csv")
    assert runs.ggn_trace_matched.notna().all() and (runs.threads == 1).all()
    assert runs.matched_loss.nunique() == 1 and (runs.steps == 2).all()
    table = pd.read_csv(tmp_path / "dose_response.csv")
    assert len(table) == 2 * len(DOSE_METRICS) and (table.n == 2).all()
    row = table[(table.noise == "gaussian") & (table.metric == "log_ggn_trace")].iloc[0]
    mine = runs[runs.noise == "gaussian"].ggn_trace.map(math.log)
    assert row["mean"] == pytest.approx(mine.mean(), rel=1e-12) and row.diff_n == 2
    assert set(runs.si_weight_norm2 > 0) == {True} and set(runs.r) == {0.0, 2.0}
