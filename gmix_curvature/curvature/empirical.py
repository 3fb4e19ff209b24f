"""The empirical Fisher trace (1/n) Σ_i ‖∇_θ ℓ_i‖² at the true labels: Tr(AᵀA)/n of Eq. 10.

This is what the paper's Eq. 10–11 reduce; it is not Tr(G) (Kunstner et al. 2019): the GGN averages
over labels drawn from the model, the empirical Fisher takes the data's labels, and on a model that fits
its data it is much smaller. Computed with the same per-sample-norm engine (one pass, exact).

With several predictions per sample it follows G's convention (§8): (1/n) Σ_t ‖∇_θ ℓ_t‖² over the n counted
predictions, the gradient of each prediction's own loss (so that its expectation over labels drawn from the
model is Tr(G)); one backward pass per position (exact, no cross terms between positions).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._engine import position_terms, run_per_sample
from gmix_curvature.curvature._loss import Loss, Predictions
from gmix_curvature.curvature._outputs import OutputFn
from gmix_curvature.curvature._result import CurvatureResult

__all__ = ["empirical_fisher_trace"]


def _ef_terms(pb: Predictions, g: torch.Generator, diag: dict) -> Iterator:
    log_w, unit = pb.loss.target_gradient(pb.stats, pb.t)  # CE: ‖p_t - e_y‖² ‖J_tᵀ u‖²
    yield from position_terms(pb, log_w, unit)


def empirical_fisher_trace(
    model: nn.Module,
    data: Any,
    *,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """(1/n) Σ_i ‖∇_θ ℓ(f(x_i), y_i)‖² (Eq. 10 divided by n), with its per-parameter blocks; over the counted
    predictions t for sequence outputs (see the module docstring). ``loss``, ``ignore_index``, ``output_fn``:
    as for :func:`~gmix_curvature.curvature.exact_ggn_trace`.

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
        progress=progress, exact=True, quantity="empirical_fisher_trace", loss=loss, ignore_index=ignore_index,
        output_fn=output_fn,
    )
