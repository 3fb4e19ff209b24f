"""curvature_snapshot, the record the training engine writes every N steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FRESH, materialise

from gmix_curvature.curvature import (
    curvature_snapshot,
    empirical_fisher_trace,
    exact_ggn_trace,
    ggn_trace,
    top_eigenvalues,
)


def test_snapshot_values_and_modes_untouched():
    model, x, y = materialise(FRESH[2])
    model.train()  # as the training engine hands it over
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        snap = curvature_snapshot(model, (x, y), method="exact", generator=torch.Generator().manual_seed(0))
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics untouched
    json.dumps(snap)
    assert snap["ggn_trace"] == pytest.approx(exact_ggn_trace(model, (x, y)).value, rel=1e-12)
    assert math.isnan(snap["ggn_trace_stderr"]) and snap["ggn_method"] == "exact"
    assert snap["empirical_fisher_trace"] == pytest.approx(empirical_fisher_trace(model, (x, y)).value, rel=1e-12)
    assert snap["top_eigenvalue"] == pytest.approx(top_eigenvalues(model, (x, y), tol=1e-10).value, rel=1e-3)
    assert snap["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(model(x).detach(), y)), rel=1e-12)
    assert snap["n_samples"] == len(y)


def test_auto_picks_exact_for_few_classes_and_fisher_is_for_many():
    model, x, y = materialise(FRESH[0])
    assert ggn_trace(model, (x, y)).method == "exact"
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 100))
    xs = torch.randn(256, 1, 4, 4, generator=g)
    ys = torch.randint(0, 100, (256,), generator=g)
    r = ggn_trace(net, (xs, ys), generator=0, target_rel_stderr=0.02)
    assert r.method == "fisher_is" and r.rel_stderr <= 0.02 and r.n_probes < 100
    assert "auto" in r.extra
    strict = ggn_trace(net, (xs, ys), generator=0, target_rel_stderr=1e-4)
    assert strict.method == "exact" and strict.extra["pilot_passes"] >= 8
