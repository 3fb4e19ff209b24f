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
from torch.func import functional_call, jvp, vjp, vmap

from gmix_curvature.curvature._param_space import check_logits, run_param_space
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature._softmax import ggn_quadratic_form, softmax_stats

__all__ = ["hutchinson_ggn_trace", "ggn_vector_product"]

_PROBE_CHUNK = 8  # probes per vmapped Jacobian-vector product


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
    buffers: dict[str, torch.Tensor] = {}

    def batch_fn(params: dict, x: torch.Tensor, y: torch.Tensor, probes: list) -> tuple:
        buffers.clear()
        buffers.update(dict(model.named_buffers()))  # inside bn_mode_context: running stats may be set aside
        names = list(params)
        detached = {k: p.detach() for k, p in params.items()}

        def f(p: dict) -> torch.Tensor:
            return functional_call(model, (p, buffers), (x,))

        def one(v: dict) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(f, (detached,), (v,))

        totals = torch.zeros(len(probes), dtype=torch.float64)
        blocks = torch.zeros(len(probes), len(names), dtype=torch.float64)
        pullback = vjp(f, detached)[1] if per_param else None
        for lo in range(0, len(probes), _PROBE_CHUNK):  # probes batched with vmap, a chunk at a time
            chunk = probes[lo : lo + _PROBE_CHUNK]
            stacked = {k: torch.stack([v[k] for v in chunk]) for k in names}
            logits, jv = vmap(one, randomness="same")(stacked)
            if lo == 0:
                check_logits(logits[0], y)
            if per_param:
                hjv = torch.stack([_h_times(jv[j], logits[j]) for j in range(len(chunk))])
                gv = vmap(pullback)(hjv)[0]
                for col, k in enumerate(names):
                    blocks[lo : lo + len(chunk), col] = (stacked[k] * gv[k]).flatten(1).sum(1, dtype=torch.float64)
                totals[lo : lo + len(chunk)] = blocks[lo : lo + len(chunk)].sum(1)
            else:
                for j in range(len(chunk)):
                    totals[lo + j] = ggn_quadratic_form(jv[j], softmax_stats(logits[j])).sum(dtype=torch.float64)
        return totals, blocks

    result = run_param_space(
        model, data, batch_fn=batch_fn, method="hutchinson", quantity="ggn_trace", num_probes=num_probes,
        generator=generator, target_rel_stderr=target_rel_stderr, max_probes=max_probes, bn_mode=bn_mode,
        batch_size=batch_size, progress=progress,
    )
    if not per_param:
        result.per_param, result.per_param_stderr = {}, {}
    return result
