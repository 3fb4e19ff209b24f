"""Optimizers by name: ``build_optimizer(name, model, lr=..., ...)``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "build_optimizer", "param_groups"]

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with ``weight_decay``; biases and normalisation parameters (every tensor of
    dimension ≤ 1) without it (Goyal et al. 2017; Nado et al. 2021)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
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
) -> torch.optim.Optimizer:
    """A torch optimizer over ``model``'s parameters, biases and normalisation parameters exempt from
    weight decay.

    ``sgd`` is heavy-ball momentum, ``nesterov`` the Nesterov form of Eq. 13 (torch's SGD with
    ``nesterov=True``), ``adam``/``adamw`` torch's Adam with L2 / decoupled decay.

    >>> build_optimizer("sgd", nn.Linear(2, 2), lr=0.1).__class__.__name__
    'SGD'
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(model, weight_decay)
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=name == "nesterov")
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
