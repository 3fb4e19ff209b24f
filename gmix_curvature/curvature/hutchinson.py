"""Parameter-space Hutchinson for Tr(G), the paper's method (Table 1): Rademacher v ∈ {±1}^d,
vᵀGv = (1/n) Σ_t ‖S_tᵀ J_t v‖² = (1/n) Σ_t (J_t v)ᵀ H_t (J_t v) (Eq. 5; over the n counted predictions, §8).

One forward-mode product (``torch.func.jvp``) a probe gives the total; the block traces v_lᵀ(Gv)_l
need the GGN-vector product Gv, i.e. one vector-Jacobian product more (``per_param=True``).
Works with BatchNorm on batch statistics (``bn_mode="train"``): J_i then differentiates through them.
The quadratic form is exact in the outputs, so several predictions per sample need nothing special: one
probe v is shared by all of them, and vᵀGv has no cross terms between positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from gmix_curvature.curvature._engine import make_predictions
from gmix_curvature.curvature._loss import Loss, Predictions, get_loss
from gmix_curvature.curvature._model import kernel_context
from gmix_curvature.curvature._outputs import OutputFn, resolve_output_fn
from gmix_curvature.curvature._param_space import functional_output, run_param_space
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.errors import GmixError

__all__ = ["hutchinson_ggn_trace", "ggn_vector_product"]

_PROBE_CHUNK = 8  # probes per vmapped Jacobian-vector product


def default_targets(out: torch.Tensor, loss: Loss) -> torch.Tensor:
    """Targets that count every prediction, for products that do not depend on the labels (H does not)."""
    if loss.name != "cross_entropy":
        return torch.zeros_like(out)
    if out.ndim != 2:
        raise GmixError(f"pass the labels y for logits of shape {tuple(out.shape)}: they decide the layout and mask")
    return torch.zeros(out.shape[0], dtype=torch.int64, device=out.device)


def ggn_vector_product(
    model: nn.Module,
    x: Any,
    v: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
    *,
    y: torch.Tensor | None = None,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_t J_tᵀ H_t J_t v over the counted predictions of the batch x (a sum; divide by n for G, §8), v keyed by
    parameter name. ``y`` (labels) decides the layout and the mask; without it every prediction counts.

    >>> net = nn.Linear(2, 2).double()
    >>> v = {k: torch.ones_like(p) for k, p in net.named_parameters()}
    >>> sorted(ggn_vector_product(net, torch.zeros(3, 2, dtype=torch.float64), v))
    ['bias', 'weight']
    """
    loss_ = get_loss(loss)
    output_fn = resolve_output_fn(output_fn)
    params = params if params is not None else {k: p for k, p in model.named_parameters() if p.requires_grad}
    detached = {k: p.detach() for k, p in params.items()}
    f = functional_output(model, x, output_fn, dict(model.named_buffers()))
    with kernel_context():  # no forward-mode derivative in the fused attention kernels
        out, jv = jvp(f, (detached,), ({k: v[k] for k in detached},))
        pb = make_predictions(out, default_targets(out, loss_) if y is None else y, loss_, ignore_index)
        _, pullback = vjp(f, detached)
        return pullback(pb.to_output(loss_.h_times(pb.stats, pb.rows(jv))))[0]


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
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """Tr(G) by Hutchinson's estimator in parameter space (Eq. 5, mean over the counted predictions; Hutchinson
    1989). ``per_param=False`` skips the vector-Jacobian product (about half the time) and the block traces.
    ``loss``, ``ignore_index``, ``output_fn``: as for :func:`~gmix_curvature.curvature.exact_ggn_trace`.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    >>> x = torch.randn(16, 3, dtype=torch.float64); y = torch.zeros(16, dtype=torch.int64)
    >>> r = hutchinson_ggn_trace(net, (x, y), num_probes=64, generator=0)
    >>> from gmix_curvature.curvature.exact import exact_ggn_trace
    >>> abs(r.value - exact_ggn_trace(net, (x, y)).value) < 4 * r.stderr
    True
    """
    loss_ = get_loss(loss)
    out_fn = resolve_output_fn(output_fn)
    buffers: dict[str, torch.Tensor] = {}

    def batch_fn(params: dict, x: Any, y: torch.Tensor, probes: list, recount: Any) -> tuple:
        buffers.clear()
        buffers.update(dict(model.named_buffers()))  # inside bn_mode_context: running stats may be set aside
        names = list(params)
        detached = {k: p.detach() for k, p in params.items()}
        f = functional_output(model, x, out_fn, buffers)

        def one(v: dict) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(f, (detached,), (v,))

        totals = torch.zeros(len(probes), dtype=torch.float64)
        blocks = torch.zeros(len(probes), len(names), dtype=torch.float64)
        pullback = vjp(f, detached)[1] if per_param else None
        pb: Predictions | None = None
        for lo in range(0, len(probes), _PROBE_CHUNK):  # probes batched with vmap, a chunk at a time
            chunk = probes[lo : lo + _PROBE_CHUNK]
            stacked = {k: torch.stack([v[k] for v in chunk]) for k in names}
            logits, jv = vmap(one, randomness="same")(stacked)
            if pb is None:
                pb = make_predictions(logits[0], y, loss_, ignore_index, recount)
                if pb.count == 0:
                    return totals, blocks, 0
            if per_param:
                hjv = torch.stack([pb.to_output(loss_.h_times(pb.stats, pb.rows(jv[j]))) for j in range(len(chunk))])
                gv = vmap(pullback)(hjv)[0]
                for col, k in enumerate(names):
                    blocks[lo : lo + len(chunk), col] = (stacked[k] * gv[k]).flatten(1).sum(1, dtype=torch.float64)
                totals[lo : lo + len(chunk)] = blocks[lo : lo + len(chunk)].sum(1)
            else:
                for j in range(len(chunk)):
                    totals[lo + j] = loss_.quadratic_form(pb.stats, pb.rows(jv[j])).sum(dtype=torch.float64)
        return totals, blocks, pb.count if pb is not None else 0

    result = run_param_space(
        model, data, batch_fn=batch_fn, method="hutchinson", quantity="ggn_trace", num_probes=num_probes,
        generator=generator, target_rel_stderr=target_rel_stderr, max_probes=max_probes, bn_mode=bn_mode,
        batch_size=batch_size, progress=progress, extra={"loss": loss_.name}, output_fn=out_fn,
        ignore_index=ignore_index, loss=loss_,
    )
    if not per_param:
        result.per_param, result.per_param_stderr = {}, {}
    return result
