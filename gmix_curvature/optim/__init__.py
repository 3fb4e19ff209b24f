"""Optimizers and learning-rate schedules, built by name.

``optimizer_from_config(model, config)`` and ``schedule_from_config(config, total_steps)`` are what the
training engine calls (through ``build_optimizer`` and ``build_schedule``); a schedule is a pure function
of the optimizer step (not of micro-batches). ``apply_bn_gamma0`` sets γ₀ of Table 3.
"""

from gmix_curvature.optim.batchnorm import apply_bn_gamma0, final_bn_layers
from gmix_curvature.optim.config import optimizer_from_config, peak_lr, schedule_from_config
from gmix_curvature.optim.factory import OPTIMIZERS, build_optimizer, is_exempt, param_groups
from gmix_curvature.optim.lars import LARS
from gmix_curvature.optim.schedules import (
    SCHEDULES,
    ScheduleLR,
    build_schedule,
    constant_lr,
    cosine_lr,
    inverse_sqrt_lr,
    linear_scaled_lr,
    polynomial_lr,
    scaled_warmup_steps,
)

__all__ = [
    # optimizers
    "OPTIMIZERS",
    "LARS",
    "build_optimizer",
    "param_groups",
    "is_exempt",
    "apply_bn_gamma0",
    "final_bn_layers",
    # schedules
    "SCHEDULES",
    "build_schedule",
    "constant_lr",
    "cosine_lr",
    "polynomial_lr",
    "inverse_sqrt_lr",
    "linear_scaled_lr",
    "scaled_warmup_steps",
    "ScheduleLR",
    # from a configuration
    "optimizer_from_config",
    "schedule_from_config",
    "peak_lr",
]
