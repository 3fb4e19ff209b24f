"""Exact Tr(G) (H = S Sᵀ factorisation) against the GGN materialised with torch.func.jacrev, BackPACK's
DiagGGNExact and curvlinops' GGNLinearOperator; block traces; backends; uneven batches."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FRESH, materialise
from torch import nn

from gmix_curvature.curvature import dense_ggn, empirical_fisher_trace, exact_ggn_trace, ggn_trace
from gmix_curvature.curvature._norms import PerSampleNorms
from gmix_curvature.curvature.reference import flat_param_names
from gmix_curvature.errors import GmixError
from gmix_curvature.mixing import per_sample_gradients_loop

REL = 1e-8  # the tolerance for exact == dense in float64


def _dense_blocks(model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, float]]:
    diag = torch.diagonal(dense_ggn(model, x))
    names = flat_param_names(model)
    blocks: dict[str, float] = {}
    for name, d in zip(names, diag.tolist()):
        blocks[name] = blocks.get(name, 0.0) + d
    return float(diag.sum()), blocks


def test_exact_matches_dense_ggn_with_blocks(case):
    c, model, x, y = case
    total, blocks = _dense_blocks(model, x)
    r = exact_ggn_trace(model, (x, y))
    assert r.value == pytest.approx(total, rel=REL)
    assert r.stderr is None and r.method == "exact" and r.bn_mode == "eval" and r.n_samples == c.n
    assert set(r.per_param) == set(blocks)
    for name, b in blocks.items():
        assert r.per_param[name] == pytest.approx(b, rel=REL, abs=1e-12 * total)
    assert sum(r.per_param.values()) == pytest.approx(r.value, rel=1e-12)


@pytest.mark.parametrize("backend", ["hooks", "func"])
def test_backends_agree(fresh_case, backend):
    c, model, x, y = fresh_case
    r = exact_ggn_trace(model, (x, y), backend=backend)
    assert r.extra["backend"] == backend
    assert r.value == pytest.approx(_dense_blocks(model, x)[0], rel=REL)


@pytest.mark.parametrize("rule", ["ghost", "materialise"])
def test_conv_rules_agree(rule):
    model, x, _ = materialise(FRESH[3])  # the residual CNN
    params = dict(model.named_parameters())
    ref = PerSampleNorms(model, params, "func")
    ref.forward(x)
    psn = PerSampleNorms(model, params, "hooks", conv_rule=rule)
    psn.forward(x)
    v = torch.randn(x.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want, got = ref.norms(v), psn.norms(v)
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-14)


def test_per_sample_norms_match_loop(mlp_cases):
    """The engine's per-sample gradients are those of one backward pass per sample (mixing.py's reference)."""
    c, model, x, y = mlp_cases
    grads = per_sample_gradients_loop(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    r = empirical_fisher_trace(model, (x, y))
    assert r.value == pytest.approx(float(grads.square().sum(1).mean()), rel=REL)
    assert r.quantity == "empirical_fisher_trace"


@pytest.mark.parametrize(("idx", "dtype", "rel"), [(0, torch.float64, REL), (2, torch.float32, 1e-4)],
                         ids=["tanh_mlp-float64", "cnn_bn-float32"])
def test_exact_matches_backpack_diag_ggn_exact(idx, dtype, rel):
    """BackPACK's convolution derivatives run in float32 only (float64 fails inside it): float32 rounding there."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model, x, y = materialise(FRESH[idx])
    model, x = copy.deepcopy(model).to(dtype), x.to(dtype)
    net = extend(copy.deepcopy(model))  # extend installs hooks: keep them off the shared case model
    loss = extend(nn.CrossEntropyLoss())(net(x), y)
    with backpack(DiagGGNExact()):
        loss.backward()
    blocks = {name: float(p.diag_ggn_exact.sum()) for name, p in net.named_parameters()}
    r = exact_ggn_trace(model, (x, y))
    assert r.value == pytest.approx(sum(blocks.values()), rel=rel)
    for name, b in blocks.items():
        assert r.per_param[name] == pytest.approx(b, rel=rel, abs=rel * 1e-4 * r.value)


def test_exact_matches_curvlinops_ggn():
    from curvlinops import GGNLinearOperator

    model, x, y = materialise(FRESH[2])
    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(x[:5], y[:5]), (x[5:], y[5:])],
                           check_deterministic=False)
    dim = sum(p.numel() for p in params)
    dense = op @ torch.eye(dim, dtype=torch.float64)
    assert exact_ggn_trace(model, (x, y)).value == pytest.approx(float(dense.trace()), rel=REL)


@pytest.mark.parametrize("method", ["exact", "fisher_is", "output_hutchinson", "fisher_mc", "hutchinson"])
def test_uneven_batches_equal_one_batch(method):
    """Batches are weighted by size: 24 samples as 7 + 7 + 7 + 3 give the one-batch value (same draws for
    the per-sample methods only when batches coincide, so compare exact values, and means of stochastic
    ones against exact within their standard errors)."""
    model, x, y = materialise(FRESH[0])
    whole = exact_ggn_trace(model, (x, y)).value
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 24, 7)]
    assert [len(b[1]) for b in batches] == [7, 7, 7, 3]
    r = ggn_trace(model, batches, method, num_probes=16, generator=3)
    assert r.n_samples == 24
    if method == "exact":
        assert r.value == pytest.approx(whole, rel=1e-12)
        assert ggn_trace(model, (x, y), method, batch_size=5).value == pytest.approx(whole, rel=1e-12)
    else:
        assert abs(r.value - whole) < 4 * r.stderr  # 4 standard errors: a 6e-5 false-alarm rate


def test_iterator_and_dataset_inputs():
    model, x, y = materialise(FRESH[0])
    want = exact_ggn_trace(model, (x, y)).value
    assert exact_ggn_trace(model, iter([(x[:10], y[:10]), (x[10:], y[10:])])).value == pytest.approx(want, rel=1e-12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    assert exact_ggn_trace(model, loader).value == pytest.approx(want, rel=1e-12)


def test_frozen_parameters_are_excluded():
    model, x, y = materialise(FRESH[0])
    net = copy.deepcopy(model)
    net[1].weight.requires_grad_(False)
    r = exact_ggn_trace(net, (x, y))
    assert "1.weight" not in r.per_param
    full = exact_ggn_trace(model, (x, y))
    assert r.value == pytest.approx(full.value - full.per_param["1.weight"], rel=1e-10)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ((torch.zeros(0, 1, 4, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)), "empty"),
        ((torch.zeros(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 10])), "labels out of range"),
        ((torch.zeros(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, -1, 2])), "labels out of range"),
        ((torch.zeros(3, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)), "as long as the batch"),
        ((torch.zeros(3, 1, 4, 4, dtype=torch.float64), torch.zeros(3)), "integer class indices"),
        ([torch.zeros(3)], "pair"),
    ],
    ids=["empty", "label-too-big", "label-negative", "length-mismatch", "float-labels", "not-pairs"],
)
def test_bad_data(data, match):
    model, _, _ = materialise(FRESH[0])
    with pytest.raises(GmixError, match=match):
        exact_ggn_trace(model, data)


def test_bad_arguments():
    model, x, y = materialise(FRESH[2])
    with pytest.raises(GmixError, match="bn_mode='eval'"):
        exact_ggn_trace(model, (x, y), bn_mode="train")
    with pytest.raises(GmixError, match="unknown bn_mode"):
        exact_ggn_trace(model, (x, y), bn_mode="frozen")
    with pytest.raises(GmixError, match="unknown per-sample-norm backend"):
        exact_ggn_trace(model, (x, y), backend="backpack")
    with pytest.raises(GmixError, match="unknown method 'lanczos'; valid: auto, exact"):
        ggn_trace(model, (x, y), "lanczos")
    with pytest.raises(GmixError, match="batch_size must be >= 1"):
        ggn_trace(model, (x, y), "exact", batch_size=0)
