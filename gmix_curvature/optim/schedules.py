"""Learning-rate schedules as pure functions of the optimizer step t (0-based)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

__all__ = ["SCHEDULES", "build_schedule", "cosine_lr", "polynomial_lr", "constant_lr"]


def constant_lr(step: int, *, lr_peak: float, warmup_steps: int = 0, **_: float) -> float:
    """``lr_peak`` after a linear warmup from 0 over ``warmup_steps``.

    >>> constant_lr(5, lr_peak=1.0, warmup_steps=10)
    0.5
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr_peak * step / warmup_steps
    return lr_peak


def cosine_lr(
    step: int, *, total_steps: int, warmup_steps: int, lr_peak: float, lr_final: float = 0.0, **_: float
) -> float:
    """Linear warmup from 0 to ``lr_peak`` over ``warmup_steps``, then cosine decay to ``lr_final`` at
    ``total_steps``.

    >>> cosine_lr(0, total_steps=10, warmup_steps=0, lr_peak=1.0)
    1.0
    >>> cosine_lr(10, total_steps=10, warmup_steps=0, lr_peak=1.0)
    0.0
    """
    if step < warmup_steps:
        return lr_peak * step / warmup_steps
    frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr_final + 0.5 * (lr_peak - lr_final) * (1.0 + math.cos(math.pi * frac))


def polynomial_lr(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    lr_init: float = 0.0,
    lr_peak: float,
    lr_final: float = 0.0,
    p_warmup: float = 1.0,
    p_decay: float = 2.0,
) -> float:
    """Eq. 15 (Appendix A; Nado et al. 2021): polynomial warmup to ``lr_peak``, polynomial decay to
    ``lr_final`` at ``total_steps``.

    >>> polynomial_lr(706, total_steps=2512, warmup_steps=706, lr_peak=7.05, lr_final=6e-6, p_warmup=2.0)
    7.05
    """
    t = min(step, total_steps)
    if t <= warmup_steps:
        frac = t / warmup_steps if warmup_steps > 0 else 1.0
        return lr_init + (lr_peak - lr_init) * frac**p_warmup
    frac = (total_steps - t) / max(1, total_steps - warmup_steps)
    return lr_final + (lr_peak - lr_final) * frac**p_decay


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant_lr,
    "cosine": cosine_lr,
    "poly": polynomial_lr,
}


def build_schedule(name: str, **kwargs: float) -> Callable[[int], float]:
    """The schedule ``name`` with its keyword arguments bound: a function step → learning rate.

    >>> build_schedule("cosine", total_steps=10, warmup_steps=2, lr_peak=0.1)(1)
    0.05
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return partial(SCHEDULES[name], **kwargs)
