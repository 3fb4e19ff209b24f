"""The bridge from a training configuration to an optimizer and a schedule (called by the engine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gmix_curvature.optim.factory import build_optimizer
from gmix_curvature.optim.schedules import build_schedule, linear_scaled_lr

__all__ = ["optimizer_from_config", "schedule_from_config", "peak_lr"]


def peak_lr(config: Any) -> float:
    """The peak learning rate: ``lr``, scaled by ``batch_size / base_batch`` under the linear scaling rule
    (Goyal et al. 2017; Section 5.1 uses 0.1 per 200 samples for SGD and LARS, 10⁻³ for Adam and LAMB).

    >>> from types import SimpleNamespace
    >>> peak_lr(SimpleNamespace(lr=0.1, lr_scaling="linear", batch_size=5000, base_batch=200))
    2.5
    """
    if config.lr_scaling == "linear":
        return linear_scaled_lr(config.lr, config.batch_size, config.base_batch)
    if config.lr_scaling != "none":
        raise ValueError(f"unknown lr_scaling {config.lr_scaling!r}; valid: none, linear")
    return config.lr


def optimizer_from_config(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    """The optimizer a resolved TrainConfig names, at its peak learning rate."""
    return build_optimizer(
        config.optimizer,
        model,
        lr=peak_lr(config),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        betas=tuple(config.betas),
        eps=config.eps,
        trust_coefficient=getattr(config, "trust_coefficient", 1e-3),
    )


def schedule_from_config(config: Any, total_steps: int) -> Callable[[int], float]:
    """The learning rate at optimizer step t (0-based) for a resolved TrainConfig (``warmup_steps`` set)."""
    return build_schedule(
        config.schedule,
        total_steps=total_steps,
        warmup_steps=int(config.warmup_steps or 0),
        lr_init=config.lr_init,
        lr_peak=peak_lr(config),
        lr_final=config.lr_final,
        p_warmup=config.p_warmup,
        p_decay=config.p_decay,
    )
