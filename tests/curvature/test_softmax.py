"""Softmax quantities on saturated outputs: float32 must agree with float64 where float64 is exact, and a
sample whose Tr(H_i) underflows contributes zero, never a NaN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gmix_curvature.curvature import exact_ggn_trace, fisher_is_ggn_trace, ggn_trace
from gmix_curvature.curvature._softmax import ggn_quadratic_form, softmax_stats

GAPS = [0.0, 1.0, 5.0, 20.0, 40.0, 80.0]  # logit margins; 1 - p_top ≈ e^-gap is below float32's eps from 17 on


def _logits(dtype: torch.dtype) -> torch.Tensor:
    rows = [[gap, 0.0, -1.0, 0.5 - gap / 4] for gap in GAPS]
    return torch.tensor(rows, dtype=dtype)


def _h(p: torch.Tensor) -> torch.Tensor:
    """diag(p) - p pᵀ with the diagonal as p_c Σ_{c' ≠ c} p_c' (p_c - p_c² cancels on saturated rows)."""
    h = -p.unsqueeze(2) * p.unsqueeze(1)
    rest = 1 - p
    top = p.argmax(1)
    rows = torch.arange(p.shape[0])
    rest[rows, top] = torch.stack([torch.cat([q[:t], q[t + 1 :]]).sum() for q, t in zip(p, top)])
    torch.diagonal(h, dim1=1, dim2=2).copy_(p * rest)
    return h


def test_float32_matches_float64_on_saturated_logits():
    s32, s64 = softmax_stats(_logits(torch.float32)), softmax_stats(_logits(torch.float64))
    torch.testing.assert_close(s32.trace_h.double(), s64.trace_h, rtol=1e-5, atol=0)
    torch.testing.assert_close(s32.log_trace_h.double(), s64.log_trace_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s32.log_dist2.double(), s64.log_dist2, rtol=1e-5, atol=1e-5)
    # Tr(H) = 1 - ‖p‖², computed naively in float64 where that is still accurate (gap <= 5)
    naive = 1 - (s64.p**2).sum(1)
    torch.testing.assert_close(s64.trace_h[:3], naive[:3], rtol=1e-12, atol=0)


def test_s_factorises_h_and_unit_directions():
    s = softmax_stats(_logits(torch.float64))
    eye = torch.eye(4, dtype=torch.float64)
    cols = torch.stack([s.s_times(eye[c].expand(len(GAPS), 4)) for c in range(4)], dim=2)  # S_i e_c
    torch.testing.assert_close(cols @ cols.transpose(1, 2), _h(s.p), rtol=1e-10, atol=1e-300)
    c = torch.tensor([0, 1, 2, 3, 0, 1])
    u = s.unit_direction(c)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(len(GAPS), dtype=torch.float64))
    a = torch.randn(len(GAPS), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = torch.einsum("nc,ncd,nd->n", a, _h(s.p), a)
    torch.testing.assert_close(ggn_quadratic_form(a, s), want, rtol=1e-8, atol=1e-300)


def test_underflowing_trace_contributes_zero_not_nan():
    s = softmax_stats(torch.tensor([[0.0, 300.0, 1.0]], dtype=torch.float32))  # Tr(H) = e^-299: underflows
    assert s.trace_h.item() == 0.0 and torch.isfinite(s.log_trace_h).all()
    assert torch.isfinite(s.unit_direction(torch.tensor([1]))).all()
    assert torch.isfinite(s.unit_direction(torch.tensor([0]))).all()


def test_fisher_is_in_float32_on_a_saturated_model():
    """A head scaled until the softmax saturates in float32: fisher_is stays finite and matches the exact
    float64 value to float32 accuracy (the estimate is exact for a single linear layer: constant quotient)."""
    g = torch.Generator().manual_seed(0)
    net = nn.Linear(6, 4)
    with torch.no_grad():
        net.weight.copy_(torch.randn(4, 6, generator=g) * 12)
    x = torch.randn(32, 6, generator=g)
    y = torch.zeros(32, dtype=torch.int64)
    p_top = torch.softmax(net(x).double(), 1).max(1).values
    assert (1 - p_top).min() < 1e-8  # saturated beyond float32's resolution of 1 - p
    r32 = fisher_is_ggn_trace(net, (x, y), num_probes=4, generator=0)
    exact64 = exact_ggn_trace(copy.deepcopy(net).double(), (x.double(), y)).value
    assert torch.isfinite(torch.tensor(r32.value))
    assert r32.value == pytest.approx(exact64, rel=1e-4)
    assert ggn_trace(net, (x, y), "exact").value == pytest.approx(exact64, rel=1e-4)
    assert ggn_trace(net, (x, y), "output_hutchinson", num_probes=4, generator=0).value > 0
