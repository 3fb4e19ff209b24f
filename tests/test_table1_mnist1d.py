"""The mnist1d Table 1 preset end to end at micro size (a few steps, 2 seeds, κ selection included), the
measurement knobs, and the pairing the comparisons rely on: every row of one seed starts from the same
initialisation and sees the same data order."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch

from gmix_curvature.cli import main
from gmix_curvature.data import load_dataset
from gmix_curvature.table1 import PAIRED_METRICS, run_table1, table1_preset
from gmix_curvature.table1.runs import run_config
from gmix_curvature.train import train


def test_mnist1d_preset_settings():
    p = table1_preset("mnist1d")
    assert (p.train["model"], p.train["data"], p.batch_size, p.small_batch_size) == ("mnist1d_cnn", "mnist1d", 1000, 32)
    assert (p.train["optimizer"], p.train["momentum"], p.train["weight_decay"], p.train["schedule"]) == (
        "sgd", 0.9, 5e-4, "cosine")
    assert p.train["lr_scaling"] == "linear" and p.train["epochs"] == 60 and p.seeds >= 8
    assert p.select_splits == ("fit", "val") and p.kappa_sweep and p.threads == 1


def test_mnist1d_preset_end_to_end_at_micro_size(tmp_path):
    small = dataclasses.replace(table1_preset("mnist1d"), select_seeds=1, kappa_sweep=(1.0, 2.0), trace_points=2,
                                trace_samples=32)
    result = run_table1(small, seeds=2, max_steps=3, measure_samples=40, eigen_samples=0, hessian_probes=1,
                        out=tmp_path, plot=True)
    assert result.selection is not None and set(result.selection.chosen.values()) <= {1.0, 2.0}
    assert [r.method for r in result.rows] == ["small_batch", "baseline", "gaussian", "rademacher"]
    assert {(r.method, r.seed, r.steps) for r in result.runs} == {
        (m, s, 3) for m in ("small_batch", "baseline", "gaussian", "rademacher") for s in (0, 1)}
    assert len(result.samples["measure"].indices) == 40 and math.isnan(result.runs[0].metrics["lambda_max_ggn"])
    # every comparison × metric paired over both seeds, Holm-adjusted within each comparison
    assert len(result.comparisons) == 3 * len(PAIRED_METRICS)
    for c in result.comparisons:
        assert c.n == 2 and c.p_holm >= c.p_value - 1e-15
    assert [(v.row, v.reference) for v in result.verdicts] == [
        ("baseline", "small_batch"), ("gaussian", "baseline"), ("rademacher", "baseline"), ("gaussian", "baseline"),
        ("rademacher", "baseline")]
    with open(tmp_path / "paired.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.comparisons) and float(rows[0]["mean"]) == pytest.approx(result.comparisons[0].mean)
    saved = json.loads((tmp_path / "table1.json").read_text())
    assert saved["preset"]["name"] == "mnist1d" and len(saved["verdicts"]) == 5
    text = (tmp_path / "table1.md").read_text()
    assert "Verdict, preset 'mnist1d'" in text and "detectable (80 % power)" in text
    config = json.loads((tmp_path / "baseline-seed0" / "config.json").read_text())
    assert (config["data"], config["model"], config["batch_size"]) == ("mnist1d", "mnist1d_cnn", 1000)


@pytest.mark.parametrize("preset", ["micro", "mnist1d"])
def test_rows_of_one_seed_share_initialisation_and_data_order(preset):
    """After one step whose learning rate is 0 (warmup starts at 0) the weights are still the initialisation and the
    BatchNorm buffers hold the statistics of the first batch: equal across rows of one seed (same init; same
    batch at the same batch size, whatever the noise), different for another seed."""
    p = dataclasses.replace(table1_preset(preset), train={**table1_preset(preset).train, "model_kwargs": {"width": 4}})
    data = (load_dataset(p.train["data"], "train").subset(256), load_dataset(p.train["data"], "test").subset(16))

    def first_step(noise, batch, seed):
        cfg = run_config(p, noise=noise, batch_size=batch, kappa_ratio=2.0, seed=seed, out=None, num_train=256,
                         max_steps=1, device="cpu", progress=False, trace=False)
        assert cfg.warmup_steps is None or cfg.warmup_steps >= 0
        return train(dataclasses.replace(cfg, warmup_steps=1, eval_every=None), datasets=data).model.state_dict()

    base, mixed, rad = (first_step(n, 64, 0) for n in ("none", "gaussian", "rademacher"))
    small, other = first_step("none", 16, 0), first_step("none", 64, 1)
    for k in base:
        assert torch.equal(base[k], mixed[k]) and torch.equal(base[k], rad[k]), k
    weights = [k for k in base if k.endswith("weight") or k.endswith("bias")]
    assert all(torch.equal(base[k], small[k]) for k in weights)  # the small batch: the same initialisation
    assert not all(torch.equal(base[k], other[k]) for k in weights)  # another seed: another one


@pytest.mark.parametrize(
    "argv,match",
    [(["--measure-samples", "-1"], "measure_samples must be an integer >= 0"),
     (["--hessian-probes", "-2"], "hessian_probes must be an integer >= 0"),
     (["--trace-points", "-1"], "trace_points must be an integer >= 0")],
)
def test_cli_measurement_knobs_reject_negative_counts(capsys, argv, match):
    assert main(["table1", "--preset", "micro", *argv]) == 2
    assert match in capsys.readouterr().err
