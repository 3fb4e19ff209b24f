"""Dense, obviously-correct references for the tests: G and the Hessian materialised with ``torch.func``.

Slow (they build the full n×C×d Jacobian) and meant for tiny models in float64. The model is evaluated
as it is (call ``model.eval()`` first for running BatchNorm statistics).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

__all__ = ["dense_ggn", "dense_hessian", "dense_jacobian", "flat_param_names"]


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


def _flat_fn(model: nn.Module, x: torch.Tensor, out_fn):
    params, names, shapes = _split(model)
    buffers = dict(model.named_buffers())
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        return out_fn(functional_call(model, (parts, buffers), (x,)))

    return f, theta


def dense_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J with J[i, c, :] = ∂f_c(x_i)/∂θ, shape (n, C, d)."""
    f, theta = _flat_fn(model, x, lambda out: out)
    return jacrev(f)(theta)


def dense_ggn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G = (1/n) Σ_i J_iᵀ (diag p_i - p_i p_iᵀ) J_i (Eq. 5), a dense d×d matrix.

    >>> net = nn.Linear(2, 2).double()
    >>> dense_ggn(net, torch.zeros(1, 2, dtype=torch.float64)).shape
    torch.Size([6, 6])
    """
    jac = dense_jacobian(model, x)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("nci,ncd,ndj->ij", jac, h, jac) / x.shape[0]


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Hessian of the mean cross-entropy (1/n) Σ_i ℓ_i over θ, a dense d×d matrix."""
    f, theta = _flat_fn(model, x, lambda out: torch.nn.functional.cross_entropy(out, y))
    return hessian(f)(theta)
