"""Optimizers by name: ``build_optimizer(name, model, lr=..., ...)``.

========= ===================================================================================== ==========
name      update                                                                                source
========= ===================================================================================== ==========
sgd       heavy ball: v ← μv + g + λw; w ← w − γv                                               torch SGD
nesterov  v ← μv + g + λw; w ← w − γ(g + λw + μv): Eq. 13 at the look-ahead point θ + μv        torch SGD
adam      Adam (Kingma & Ba 2015), L2 decay λw added to the gradient                            torch Adam
adamw     Adam with decoupled decay (Loshchilov & Hutter 2019)                                  torch AdamW
lars      You et al. (2017) Algorithm 1, LR inside the momentum (see :mod:`.lars`)               own
lamb      You et al. (2019) Algorithm 2 / Appendix B.2, ε outside the square root              timm Lamb
========= ===================================================================================== ==========

Every optimizer exempts biases and BatchNorm/LayerNorm parameters (every tensor with ndim ≤ 1) from
weight decay, and LARS and LAMB also from layer-wise adaptation (Section 5.3; Goyal et al. 2017;
You et al. 2017; Nado et al. 2021). theory/OPTIMIZERS.md gives the reasons for each variant.
"""

from __future__ import annotations

import torch
from torch import nn

from gmix_curvature.optim.lars import LARS

__all__ = ["OPTIMIZERS", "build_optimizer", "param_groups", "is_exempt"]

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "lars", "lamb")


def is_exempt(param: torch.Tensor) -> bool:
    """Whether a parameter is exempt from weight decay and layer-wise adaptation: biases and
    normalisation scales/shifts, i.e. every tensor of dimension ≤ 1.

    >>> is_exempt(nn.BatchNorm2d(3).weight), is_exempt(nn.Conv2d(1, 3, 3).weight)
    (True, False)
    """
    return param.ndim <= 1


def param_groups(model: nn.Module, weight_decay: float, *, adapt_key: str | None = None) -> list[dict]:
    """Two groups: weights with ``weight_decay``; biases and normalisation parameters (every tensor of
    dimension ≤ 1) without it (Goyal et al. 2017; Nado et al. 2021).

    With ``adapt_key`` (``"adapt"`` for LARS, ``"always_adapt"`` for timm's Lamb) the first group gets
    ``adapt_key: True`` and the second ``adapt_key: False``: no layer-wise adaptation for the exempt ones.

    >>> [len(g["params"]) for g in param_groups(nn.Linear(2, 2), 0.1)]
    [1, 1]
    >>> [g["adapt"] for g in param_groups(nn.Linear(2, 2), 0.1, adapt_key="adapt")]
    [True, False]
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if is_exempt(p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if adapt_key is not None:
        for g, adapt in zip(groups, (True, False)):
            g[adapt_key] = adapt
    return groups


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    trust_coefficient: float = 1e-3,
) -> torch.optim.Optimizer:
    """A torch optimizer over ``model``'s parameters, biases and normalisation parameters exempt from
    weight decay (and, for LARS and LAMB, from the trust ratio). See the module table.

    ``eps`` is Adam's/LAMB's ε (added to √v̂); for LARS it is the ε of the trust ratio's denominator.
    ``trust_coefficient`` is LARS's η (10⁻³ in the paper); LAMB has none (φ(z) = z, You et al. 2019).

    >>> build_optimizer("sgd", nn.Linear(2, 2), lr=0.1).__class__.__name__
    'SGD'
    >>> build_optimizer("lars", nn.Linear(2, 2), lr=0.1).__class__.__name__
    'LARS'
    >>> build_optimizer("rmsprop", nn.Linear(2, 2), lr=0.1)
    Traceback (most recent call last):
    ...
    ValueError: unknown optimizer 'rmsprop'; valid: sgd, nesterov, adam, adamw, lars, lamb
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    betas = (float(betas[0]), float(betas[1]))
    if name in ("sgd", "nesterov"):
        if name == "nesterov" and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return torch.optim.SGD(
            param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=name == "nesterov"
        )
    if name == "adam":
        return torch.optim.Adam(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    if name == "lars":
        return LARS(
            param_groups(model, weight_decay, adapt_key="adapt"),
            lr=lr,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            eps=eps,
        )
    # lamb: timm's Lamb with global gradient clipping off (max_grad_norm=None, NVIDIA's addition),
    # trust ratio unclipped (φ(z) = z), L2 decay inside the trust-ratio update (r + λw), bias correction on.
    from timm.optim import Lamb

    return Lamb(
        param_groups(model, weight_decay, adapt_key="always_adapt"),
        lr=lr,
        betas=betas,
        eps=eps,
        bias_correction=True,
        grad_averaging=True,
        max_grad_norm=None,
        trust_clip=False,
        decoupled_decay=False,
    )
