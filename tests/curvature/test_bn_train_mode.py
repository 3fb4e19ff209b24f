"""bn_mode="train": BatchNorm on batch statistics (batch-coupled G), for the methods that allow it."""

from __future__ import annotations

import pytest
import torch
from conftest import FRESH, materialise

from gmix_curvature.curvature import dense_ggn, ggn_trace, hessian_trace
from gmix_curvature.curvature._model import bn_mode_context

Z = 4.0  # standard errors allowed between a stochastic mean and the exact value


def test_hutchinson_with_batch_statistics_matches_the_dense_batch_coupled_ggn():
    model, x, y = materialise(FRESH[3])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with bn_mode_context(model, "train"):
        dense = float(dense_ggn(model, x).trace())  # J differentiates through the batch statistics
    eval_dense = float(dense_ggn(model, x).trace())
    r = ggn_trace(model, (x, y), "hutchinson", num_probes=48, generator=2, bn_mode="train")
    assert r.bn_mode == "train" and r.method == "hutchinson"
    assert abs(r.value - dense) < Z * r.stderr
    assert abs(dense - eval_dense) > 0.05 * eval_dense  # the two modes measure different matrices
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics neither used nor updated
    assert not model.training


def test_auto_uses_hutchinson_and_per_sample_methods_refuse():
    model, x, y = materialise(FRESH[2])
    r = ggn_trace(model, (x, y), bn_mode="train", generator=0, num_probes=8, target_rel_stderr=0.5)
    assert r.method == "hutchinson" and "bn_mode='train'" in r.extra["auto"]
    assert hessian_trace(model, (x, y), num_probes=2, generator=0, bn_mode="train").bn_mode == "train"
    for method in ("exact", "fisher_is", "output_hutchinson", "fisher_mc"):
        with pytest.raises(ValueError, match="needs independent per-sample terms"):
            ggn_trace(model, (x, y), method, bn_mode="train")
