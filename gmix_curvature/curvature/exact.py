"""Exact Tr(G) through the factorisation H_i = S_i S_iᵀ: C per-sample-norm passes over the data, not C·n.

With S_i = diag(√p_i) - p_i √p_iᵀ (so S_i S_iᵀ = diag(p_i) - p_i p_iᵀ = H_i) and Eq. 5,

    Tr(G) = (1/n) Σ_i Tr(J_iᵀ S_i S_iᵀ J_i) = (1/n) Σ_i Σ_c ‖J_iᵀ S_i e_c‖²,

and S_i e_c = √p_ic (e_c - p_i): the c-th term is the per-sample squared gradient norm of the surrogate
loss ⟨f_i, S_i e_c⟩, i.e. p_ic ‖∇ℓ(f_i, c)‖², the Fisher's expectation over labels written out in full.
One forward pass per batch is shared by the C backward passes. See theory/CURVATURE.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._engine import run_per_sample
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature._softmax import SoftmaxStats

__all__ = ["exact_ggn_trace"]


def _exact_terms(stats: SoftmaxStats, y: torch.Tensor, g: torch.Generator, diag: dict) -> list:
    n, num_classes = stats.p.shape
    out = []
    for c in range(num_classes):
        cls = torch.full((n,), c, dtype=torch.int64, device=stats.p.device)
        w = torch.exp(stats.logp[:, c] + stats.log_dist2[:, c])  # p_ic ‖p_i - e_c‖²
        out.append((w, stats.unit_direction(cls)))
    return out


def exact_ggn_trace(
    model: nn.Module,
    data: Any,
    *,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> CurvatureResult:
    """Exact Tr(G(θ)) of softmax cross-entropy (Eq. 5, mean over samples) with its block traces.

    ``result.per_param[name]`` is Tr(G_ll) of that parameter's diagonal block; they sum to the value.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 3)).double()
    >>> x = torch.randn(6, 4, dtype=torch.float64); y = torch.zeros(6, dtype=torch.int64)
    >>> r = exact_ggn_trace(net, (x, y))
    >>> from gmix_curvature.curvature.reference import dense_ggn
    >>> abs(r.value - float(dense_ggn(net, x).trace())) < 1e-12
    True
    """
    return run_per_sample(
        model, data, terms=_exact_terms, method="exact", num_probes=1, generator=0, target_rel_stderr=None,
        max_probes=None, bn_mode=bn_mode, batch_size=batch_size, backend=backend, progress=progress, exact=True,
    )
