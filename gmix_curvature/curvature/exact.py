"""Exact Tr(G) through the factorisation H_i = S_i S_iᵀ: C per-sample-norm passes over the data, not C·n.

With S_i = diag(√p_i) - p_i √p_iᵀ (so S_i S_iᵀ = diag(p_i) - p_i p_iᵀ = H_i) and Eq. 5,

    Tr(G) = (1/n) Σ_i Tr(J_iᵀ S_i S_iᵀ J_i) = (1/n) Σ_i Σ_c ‖J_iᵀ S_i e_c‖²,

and S_i e_c = √p_ic (e_c - p_i): the c-th term is the per-sample squared gradient norm of the surrogate
loss ⟨f_i, S_i e_c⟩, i.e. p_ic ‖∇ℓ(f_i, c)‖², the Fisher's expectation over labels written out in full.
One forward pass per batch is shared by the C backward passes. See theory/CURVATURE.md.

Several predictions per sample (a sequence's positions, a segmentation's pixels; §8): ‖Σ_t J_tᵀ S_t e_c‖²
would carry cross terms between positions, so exact runs one backward pass per (position t, column c), with
only position t nonzero: P·K backward passes per batch for P positions of width K (the result records
them in ``extra["backward_passes"]``), affordable for short sequences and small vocabularies only — ``auto``
never chooses it beyond ``AUTO_EXACT_MAX_PASSES``. Every loss of ``_loss`` works the same way through its
columns S e_c (MSE: √(2/D) e_c; sigmoid cross-entropy: √(σ(1 − σ))).
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

__all__ = ["exact_ggn_trace", "exact_terms"]


def exact_terms(pb: Predictions, g: torch.Generator, diag: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Σ_t Σ_c ‖J_tᵀ S_t e_c‖² = Σ_t Tr(J_tᵀ H_t J_t): one (w, v) per (position, column), weight ‖S_t e_c‖²
    (CE: p_c ‖p − e_c‖²) outside the norm and the unit column inside it."""
    loss, s = pb.loss, pb.stats
    log_w = loss.log_column_weights(s)
    for c in range(pb.width):
        cls = torch.full((pb.count,), c, dtype=torch.int64, device=pb.f.device)
        yield from position_terms(pb, log_w[:, c], loss.column_unit(s, cls))


def exact_ggn_trace(
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
    """Exact Tr(G(θ)) (Eq. 5, the mean over the counted predictions; §8) with its block traces.

    ``result.per_param[name]`` is Tr(G_ll) of that parameter's diagonal block; they sum to the value.
    ``loss`` is ``"cross_entropy"``, ``"mse"`` or ``"bce"``; labels equal to ``ignore_index`` are not
    counted; ``output_fn`` picks the logits out of what the model returns (default: ``model_output``).
    Cost: P·K backward passes per batch (P predictions of width K per sample), one forward pass.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 3)).double()
    >>> x = torch.randn(6, 4, dtype=torch.float64); y = torch.zeros(6, dtype=torch.int64)
    >>> r = exact_ggn_trace(net, (x, y))
    >>> from gmix_curvature.curvature.reference import dense_ggn
    >>> abs(r.value - float(dense_ggn(net, x).trace())) < 1e-12
    True
    """
    return run_per_sample(
        model, data, method="exact", num_probes=1, generator=0, target_rel_stderr=None,
        max_probes=None, bn_mode=bn_mode, batch_size=batch_size, backend=backend, progress=progress, exact=True,
        loss=loss, ignore_index=ignore_index, output_fn=output_fn, terms=exact_terms,
    )
