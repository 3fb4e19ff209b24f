"""Dense, obviously-correct references for the tests: G and the Hessian materialised with ``torch.func``.

Slow (they build the full Jacobian of every output with respect to every parameter) and meant for tiny models
in float64. The model is evaluated as it is (call ``model.eval()`` first for running BatchNorm statistics), on
the math attention kernel (``_model.kernel_context``: the fused kernels lack the derivatives).
G is formed from its definition, independently of the estimators' factorisations: G = Jᵀ (∇²_f L) J with
L = the torch loss functional (``F.cross_entropy`` with ``ignore_index``, ``F.mse_loss``,
``F.binary_cross_entropy_with_logits``, reduction ``"mean"``) of the whole output f, its Hessian in f taken
by ``torch.func.hessian`` (theory/CURVATURE.md §8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev  # hessian: of the loss in the logits only

from gmix_curvature.curvature._loss import get_loss
from gmix_curvature.curvature._model import kernel_context
from gmix_curvature.curvature._outputs import OutputFn, resolve_output_fn

__all__ = ["dense_ggn", "dense_hessian", "dense_jacobian", "flat_param_names", "reference_loss"]


def _split(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list[torch.Size]]:
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    return params, list(params), [p.shape for p in params.values()]


def flat_param_names(model: nn.Module) -> list[str]:
    """The parameter name of every coordinate of the flat θ the dense references use."""
    out = []
    for k, p in model.named_parameters():
        if p.requires_grad:
            out += [k] * p.numel()
    return out


def _flat_fn(model: nn.Module, x: Any, out_fn: Callable, output_fn: OutputFn | None = None):
    params, names, shapes = _split(model)
    buffers = dict(model.named_buffers())
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([p.reshape(-1) for p in params.values()])
    pick = resolve_output_fn(output_fn)

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        if isinstance(x, Mapping):
            return out_fn(pick(functional_call(model, (parts, buffers), (), dict(x))))
        return out_fn(pick(functional_call(model, (parts, buffers), (x,))))

    return f, theta


def dense_jacobian(model: nn.Module, x: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """J with J[i, ..., :] = ∂f(x_i)[...]/∂θ, shape (*output shape, d)."""
    f, theta = _flat_fn(model, x, lambda out: out, output_fn)
    with kernel_context():  # fused attention kernels have no second derivative; the math kernel does
        return jacrev(f)(theta)


def reference_loss(out: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy", ignore_index: int = -100):
    """The mean loss as torch computes it: F.cross_entropy (classes in dim 1, or classes last moved there),
    F.mse_loss or F.binary_cross_entropy_with_logits, reduction "mean" (over the targets that are not NaN)."""
    name = get_loss(loss).name
    if name in ("mse", "bce"):  # NaN targets are not counted: the masked mean a user writes
        keep = ~torch.isnan(y)
        fn = F.mse_loss if name == "mse" else F.binary_cross_entropy_with_logits
        return fn(out[keep], y[keep])
    if out.ndim > 2 and y.shape != (out.shape[0], *out.shape[2:]):
        out = out.movedim(-1, 1)  # classes last -> classes in dim 1
    return F.cross_entropy(out, y, ignore_index=ignore_index)


def dense_ggn(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    *,
    loss: str = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> torch.Tensor:
    """G = Jᵀ (∇²_f L) J (Eq. 5 and §8: the GGN of the mean loss over the counted predictions), a dense d×d
    matrix. Without labels every prediction counts ((N, C) logits for cross-entropy).

    >>> net = nn.Linear(2, 2).double()
    >>> dense_ggn(net, torch.zeros(1, 2, dtype=torch.float64)).shape
    torch.Size([6, 6])
    """
    jac = dense_jacobian(model, x, output_fn)
    f, theta = _flat_fn(model, x, lambda o: o, output_fn)
    with torch.no_grad(), kernel_context():
        out = f(theta)
    if y is None:
        y = torch.zeros(out.shape[0], dtype=torch.int64) if get_loss(loss).name == "cross_entropy" else out * 0
    h = hessian(lambda o: reference_loss(o, y, loss, ignore_index))(out)
    d = jac.shape[-1]
    jm = jac.reshape(-1, d)
    return jm.T @ h.reshape(jm.shape[0], jm.shape[0]) @ jm


def dense_hessian(
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    *,
    loss: str = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> torch.Tensor:
    """The Hessian of the mean loss (over the counted predictions) over θ, a dense d×d matrix.

    Formed by plain autograd, reverse over reverse, one row at a time (``torch.autograd.functional.hessian``):
    ``torch.func.hessian`` and ``jacrev(jacrev(...))`` batch the second backward pass with ``vmap``, and in
    torch 2.14 that batching is wrong through a LayerNorm fed by a parameterised layer (Linear → LayerNorm:
    entries off by 15 % of the largest, measured against finite differences of the gradient), while unbatched
    double backward and ``jvp(grad(...))`` are right.
    """
    f, theta = _flat_fn(model, x, lambda out: reference_loss(out, y, loss, ignore_index), output_fn)
    with kernel_context():
        return torch.autograd.functional.hessian(f, theta)
