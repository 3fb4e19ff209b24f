"""Hessian trace: Tr(H) == Tr(G) for a ReLU network in eval mode and not for tanh (dense references);
Hutchinson on the Hessian against the dense trace, PyHessian and curvlinops."""

from __future__ import annotations

import copy

import pytest
import torch
from cases_kernels import ROUTED, build
from conftest import FRESH, materialise
from torch import nn

from gmix_curvature.curvature import dense_hessian, exact_ggn_trace, hessian_trace, hessian_vector_product
from gmix_curvature.curvature._model import kernel_context

Z = 4.0  # standard errors allowed between a stochastic mean and the exact value
REL = 1e-8


@pytest.mark.parametrize("idx", [1, 2], ids=["relu_mlp", "cnn_bn"])
def test_piecewise_linear_hessian_trace_equals_ggn_trace(idx):
    """ReLU, max-pooling and BatchNorm in eval mode are piecewise linear: the residual term of Eq. 5 has
    a zero diagonal, so Tr(H) = Tr(G) exactly."""
    model, x, y = materialise(FRESH[idx])
    assert float(dense_hessian(model, x, y).trace()) == pytest.approx(exact_ggn_trace(model, (x, y)).value, rel=REL)


def test_tanh_hessian_trace_differs_from_ggn_trace():
    model, x, y = materialise(FRESH[0])
    tr_h = float(dense_hessian(model, x, y).trace())
    tr_g = exact_ggn_trace(model, (x, y)).value
    assert abs(tr_h - tr_g) > 1e-3 * tr_g


@pytest.mark.parametrize("idx", [0, 2], ids=["tanh_mlp", "cnn_bn"])
def test_hutchinson_hessian_trace_is_unbiased_with_block_traces(idx):
    model, x, y = materialise(FRESH[idx])
    dense = dense_hessian(model, x, y)
    r = hessian_trace(model, (x, y), num_probes=32, generator=4)
    assert r.quantity == "hessian_trace" and r.method == "hessian"
    assert abs(r.value - float(dense.trace())) < Z * r.stderr
    assert sum(r.per_param.values()) == pytest.approx(r.value, rel=1e-10)


def test_hessian_vector_product_matches_curvlinops():
    from curvlinops import HessianLinearOperator

    model, x, y = materialise(FRESH[0])
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params, [(x, y)],
                               check_deterministic=False)
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in model.named_parameters()}
    want = op @ [v[k] for k, _ in model.named_parameters()]
    got = hessian_vector_product(model, x, y, v)
    for (k, _), w in zip(model.named_parameters(), want):
        torch.testing.assert_close(got[k], w, rtol=1e-10, atol=1e-12)


def test_agrees_with_pyhessian():
    """PyHessian's Hutchinson with a fixed iteration count (its tolerance would stop early): both means
    within Z combined standard errors of each other and of the dense trace."""
    from pyhessian import hessian as PyHessian

    model, x, y = materialise(FRESH[1])
    dense = float(dense_hessian(model, x, y).trace())
    with torch.random.fork_rng():  # PyHessian draws from the global RNG; keep the caller's stream intact
        torch.manual_seed(0)
        net = copy.deepcopy(model)  # PyHessian leaves graph-carrying .grad on the parameters
        values = PyHessian(net, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(maxIter=32, tol=0.0)
    values = torch.tensor(values, dtype=torch.float64)
    assert len(values) == 32
    ph_mean, ph_se = float(values.mean()), float(values.std() / 32**0.5)
    ours = hessian_trace(model, (x, y), num_probes=32, generator=0)
    assert abs(ph_mean - dense) < Z * ph_se
    assert abs(ph_mean - ours.value) < Z * (ph_se**2 + ours.stderr**2) ** 0.5


# kernel cases: second derivatives through the kernels bn_mode_context routes around (issue 15, item 5) ----------


def _difference_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """The Jacobian of the mean loss's gradient by central differences: first derivatives only, through the
    model's own (fused) kernels."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    flat = [(p, i) for p in params for i in range(p.numel())]
    columns = []
    for p, i in flat:
        with torch.no_grad():
            p.view(-1)[i] += step
        plus = gradient()
        with torch.no_grad():
            p.view(-1)[i] -= 2 * step
        minus = gradient()
        with torch.no_grad():
            p.view(-1)[i] += step
        columns.append((plus - minus) / (2 * step))
    return torch.stack(columns, 1)


@pytest.mark.parametrize("name", ROUTED)
def test_hessian_through_fused_kernels(name):
    """nn.TransformerEncoderLayer's fused fast path (eval) and hardsigmoid's missing double backward: the dense
    Hessian through the routed kernels equals differences of gradients through the fused ones, and Hutchinson
    (hessian_trace) is unbiased for its trace."""
    model, x, y = build(name)
    with kernel_context():
        dense = dense_hessian(model, x, y)
    torch.testing.assert_close(dense, _difference_hessian(model, x, y), rtol=1e-5, atol=1e-5 * float(dense.abs().max()))
    r = hessian_trace(model, (x, y), num_probes=32, generator=5)
    assert abs(r.value - float(dense.trace())) < Z * r.stderr
