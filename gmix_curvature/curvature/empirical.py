"""The empirical Fisher trace (1/n) Σ_i ‖∇_θ ℓ_i‖² at the true labels: Tr(AᵀA)/n of Eq. 10.

This is what the paper's Eq. 10–11 reduce; it is not Tr(G) (Kunstner et al. 2019): the GGN averages
over labels drawn from the model, the empirical Fisher takes the data's labels, and on a model that fits
its data it is much smaller. Computed with the same per-sample-norm engine (one pass, exact).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._engine import run_per_sample
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature._softmax import SoftmaxStats

__all__ = ["empirical_fisher_trace"]


def _ef_terms(stats: SoftmaxStats, y: torch.Tensor, g: torch.Generator, diag: dict) -> list:
    rows = torch.arange(y.shape[0], device=y.device)
    return [(torch.exp(stats.log_dist2[rows, y]), stats.unit_direction(y))]  # ‖p_i - e_y‖² ‖J_iᵀ u‖²


def empirical_fisher_trace(
    model: nn.Module,
    data: Any,
    *,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> CurvatureResult:
    """(1/n) Σ_i ‖∇_θ ℓ(f(x_i), y_i)‖² (Eq. 10 divided by n), with its per-parameter blocks.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64); y = torch.tensor([0, 1, 1, 0])
    >>> from gmix_curvature.mixing import per_sample_gradients_loop
    >>> grads = per_sample_gradients_loop(net, torch.nn.CrossEntropyLoss(reduction="none"), x, y)
    >>> abs(empirical_fisher_trace(net, (x, y)).value - float(grads.square().sum(1).mean())) < 1e-12
    True
    """
    return run_per_sample(
        model, data, terms=_ef_terms, method="empirical_fisher", num_probes=1, generator=0,
        target_rel_stderr=None, max_probes=None, bn_mode=bn_mode, batch_size=batch_size, backend=backend,
        progress=progress, exact=True, quantity="empirical_fisher_trace",
    )
