"""Hutchinson's estimator of the Hessian trace Tr(∇²L) of the mean loss L = (1/n) Σ_t ℓ_t over the counted
predictions (cross-entropy by default; §8), with a fixed number of probes (PyHessian's default tolerance stops
early) and Hessian-vector products by double backpropagation. By Eq. 5, Tr(∇²L) = Tr(G) + the trace of the
residual term; for a piecewise-linear network in eval mode the residual's diagonal is zero, so
Tr(∇²L) = Tr(G) — a cross-check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._engine import make_predictions
from gmix_curvature.curvature._loss import Loss, get_loss
from gmix_curvature.curvature._model import kernel_context
from gmix_curvature.curvature._outputs import OutputFn, predictions, resolve_output_fn
from gmix_curvature.curvature._param_space import run_param_space
from gmix_curvature.curvature._result import CurvatureResult

__all__ = ["hessian_trace", "hessian_vector_product"]


def _summed_loss(
    model: nn.Module, x: Any, y: torch.Tensor, loss: Loss, ignore_index: int, output_fn: OutputFn, recount: Any = None
) -> tuple[torch.Tensor, int]:
    """(Σ_t ℓ_t over the batch's counted predictions, differentiable; their number)."""
    out = predictions(model, x, output_fn)
    pb = make_predictions(out, y, loss, ignore_index, recount)
    return loss.total(pb.rows(out), pb.t), pb.count


def hessian_vector_product(
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    v: dict[str, torch.Tensor],
    *,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> dict[str, torch.Tensor]:
    """∇²(Σ_t ℓ_t) v over the batch's counted predictions (a sum; divide by n for the mean loss), v keyed by
    parameter name.

    >>> net = nn.Linear(2, 2).double()
    >>> v = {k: torch.ones_like(p) for k, p in net.named_parameters()}
    >>> x, y = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)
    >>> sorted(hessian_vector_product(net, x, y, v))
    ['bias', 'weight']
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad(), kernel_context():  # the fused attention kernels have no second derivative
        total, _ = _summed_loss(model, x, y, get_loss(loss), ignore_index, resolve_output_fn(output_fn))
        grads = torch.autograd.grad(total, list(params.values()), create_graph=True)
        hv = torch.autograd.grad(grads, list(params.values()), grad_outputs=[v[k] for k in params])
    return dict(zip(params, hv))


def hessian_trace(
    model: nn.Module,
    data: Any,
    *,
    num_probes: int = 16,
    generator: torch.Generator | int | None = None,
    target_rel_stderr: float | None = None,
    max_probes: int | None = None,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    progress: bool = False,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """Tr of the Hessian of the mean loss (over the counted predictions) by Hutchinson's method, with block
    traces. ``loss``, ``ignore_index``, ``output_fn``: as for :func:`~gmix_curvature.curvature.exact_ggn_trace`.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    >>> x = torch.randn(16, 3, dtype=torch.float64); y = torch.randint(0, 2, (16,))
    >>> r = hessian_trace(net, (x, y), num_probes=64, generator=0)
    >>> from gmix_curvature.curvature.exact import exact_ggn_trace
    >>> abs(r.value - exact_ggn_trace(net, (x, y)).value) < 4 * r.stderr  # ReLU: Tr(H) = Tr(G)
    True
    """
    loss_ = get_loss(loss)
    out_fn = resolve_output_fn(output_fn)

    def batch_fn(params: dict, x: Any, y: torch.Tensor, probes: list, recount: Any) -> tuple:
        names = list(params)
        totals = torch.zeros(len(probes), dtype=torch.float64)
        blocks = torch.zeros(len(probes), len(names), dtype=torch.float64)
        with torch.enable_grad():
            total, count = _summed_loss(model, x, y, loss_, ignore_index, out_fn, recount)
            if count == 0:
                return totals, blocks, 0
            grads = torch.autograd.grad(total, list(params.values()), create_graph=True)
        for j, v in enumerate(probes):
            hv = torch.autograd.grad(grads, list(params.values()), grad_outputs=[v[k] for k in names],
                                     retain_graph=True)
            for col, (k, h) in enumerate(zip(names, hv)):
                blocks[j, col] = (v[k] * h).sum(dtype=torch.float64)
            totals[j] = blocks[j].sum()
        return totals, blocks, count

    return run_param_space(
        model, data, batch_fn=batch_fn, method="hessian", quantity="hessian_trace", num_probes=num_probes,
        generator=generator, target_rel_stderr=target_rel_stderr, max_probes=max_probes, bn_mode=bn_mode,
        batch_size=batch_size, progress=progress, extra={"loss": loss_.name}, output_fn=out_fn,
        ignore_index=ignore_index, loss=loss_,
    )
