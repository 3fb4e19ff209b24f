"""Parameter-space Hutchinson for Tr(G), the paper's method (Table 1): Rademacher v ∈ {±1}^d,
vᵀGv = (1/n) Σ_i ‖S_iᵀ J_i v‖² = (1/n) Σ_i (J_i v)ᵀ H_i (J_i v) (Eq. 5).

One forward-mode product (``torch.func.jvp``) a probe gives the total; the block traces v_lᵀ(Gv)_l
need the GGN-vector product Gv, i.e. one vector-Jacobian product more (``per_param=True``).
Works with BatchNorm on batch statistics (``bn_mode="train"``): J_i then differentiates through them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from gmix_curvature.curvature._param_space import check_logits, run_param_space
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature._softmax import ggn_quadratic_form, softmax_stats

__all__ = ["hutchinson_ggn_trace", "ggn_vector_product"]


def _h_times(a: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """H_i a_i = p_i ⊙ (a_i - p_i·a_i), relative to the top class (exact on saturated outputs)."""
    s = softmax_stats(logits)
    rows = torch.arange(a.shape[0], device=a.device)
    delta = a - a[rows, s.top].unsqueeze(1)
    return s.p * (delta - (s.p * delta).sum(1, keepdim=True))


def ggn_vector_product(
    model: nn.Module, x: torch.Tensor, v: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Σ_i J_iᵀ H_i J_i v over the batch x (a sum; divide by n for Eq. 5's G), v keyed by parameter name.

    >>> net = nn.Linear(2, 2).double()
    >>> v = {k: torch.ones_like(p) for k, p in net.named_parameters()}
    >>> sorted(ggn_vector_product(net, torch.zeros(3, 2, dtype=torch.float64), v))
    ['bias', 'weight']
    """
    params = params if params is not None else {k: p for k, p in model.named_parameters() if p.requires_grad}
    detached = {k: p.detach() for k, p in params.items()}
    buffers = dict(model.named_buffers())

    def f(p: dict) -> torch.Tensor:
        return functional_call(model, (p, buffers), (x,))

    logits, jv = jvp(f, (detached,), ({k: v[k] for k in detached},))
    _, pullback = vjp(f, detached)
    return pullback(_h_times(jv, logits))[0]


def hutchinson_ggn_trace(
    model: nn.Module,
    data: Any,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    target_rel_stderr: float | None = None,
    max_probes: int | None = None,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    per_param: bool = True,
    progress: bool = False,
) -> CurvatureResult:
    """Tr(G) by Hutchinson's estimator in parameter space (Eq. 5, mean over samples; Hutchinson 1989).

    ``per_param=False`` skips the vector-Jacobian product (about half the time) and the block traces.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    >>> x = torch.randn(16, 3, dtype=torch.float64); y = torch.zeros(16, dtype=torch.int64)
    >>> r = hutchinson_ggn_trace(net, (x, y), num_probes=64, generator=0)
    >>> from gmix_curvature.curvature.exact import exact_ggn_trace
    >>> abs(r.value - exact_ggn_trace(net, (x, y)).value) < 4 * r.stderr
    True
    """
    buffers = dict(model.named_buffers())
    names: list[str] = []

    def batch_fn(params: dict, x: torch.Tensor, y: torch.Tensor, probes: list) -> tuple:
        if not names:
            names.extend(params)
        detached = {k: p.detach() for k, p in params.items()}

        def f(p: dict) -> torch.Tensor:
            return functional_call(model, (p, buffers), (x,))

        totals = torch.zeros(len(probes), dtype=torch.float64)
        blocks = torch.zeros(len(probes), len(names), dtype=torch.float64)
        pullback = None
        for j, v in enumerate(probes):
            logits, jv = jvp(f, (detached,), (v,))
            if j == 0:
                check_logits(logits, y)
            if per_param:
                if pullback is None:
                    _, pullback = vjp(f, detached)
                gv = pullback(_h_times(jv, logits))[0]
                for col, k in enumerate(names):
                    blocks[j, col] = (v[k] * gv[k]).sum(dtype=torch.float64)
                totals[j] = blocks[j].sum()
            else:
                totals[j] = ggn_quadratic_form(jv, softmax_stats(logits)).sum(dtype=torch.float64)
        return totals, blocks

    # bn_mode_context may set BatchNorm buffers aside; read them inside the context
    def batch_fn_ctx(params: dict, x: torch.Tensor, y: torch.Tensor, probes: list) -> tuple:
        buffers.clear()
        buffers.update(dict(model.named_buffers()))
        return batch_fn(params, x, y, probes)

    result = run_param_space(
        model, data, batch_fn=batch_fn_ctx, method="hutchinson", quantity="ggn_trace", num_probes=num_probes,
        generator=generator, target_rel_stderr=target_rel_stderr, max_probes=max_probes, bn_mode=bn_mode,
        batch_size=batch_size, progress=progress,
    )
    if not per_param:
        result.per_param, result.per_param_stderr = {}, {}
    return result
