"""Optimizers and learning-rate schedules, built by name.

``build_optimizer(name, model, lr=...)`` and ``build_schedule(name, ...)`` are what the training
engine calls; a schedule is a pure function of the optimizer step (not of micro-batches).
"""

from gmix_curvature.optim.config import optimizer_from_config, peak_lr, schedule_from_config
from gmix_curvature.optim.factory import OPTIMIZERS, build_optimizer
from gmix_curvature.optim.schedules import SCHEDULES, build_schedule, cosine_lr, polynomial_lr

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "SCHEDULES",
    "build_schedule",
    "cosine_lr",
    "polynomial_lr",
    "optimizer_from_config",
    "schedule_from_config",
    "peak_lr",
]
