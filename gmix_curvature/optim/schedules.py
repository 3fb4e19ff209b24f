"""Learning-rate schedules as pure functions of the optimizer step t (0-based), and the scaling rules.

A schedule counts *optimizer* steps: with gradient accumulation one step is one logical batch, however
many micro-batches it takes. :class:`ScheduleLR` turns any of them into a torch LR scheduler.

======== ==================================================================================
name     η_t
======== ==================================================================================
constant linear warmup from 0 to η_peak, then η_peak
cosine   linear warmup, then cosine decay to η_final
poly     Eq. 15 (Appendix A; Nado et al. 2021): polynomial warmup and polynomial decay
rsqrt    linear warmup to η_peak at t_warmup, then η_peak·√(t_warmup/t) (Vaswani et al. 2017; §5.2)
======== ==================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

__all__ = [
    "SCHEDULES",
    "build_schedule",
    "constant_lr",
    "cosine_lr",
    "polynomial_lr",
    "inverse_sqrt_lr",
    "linear_scaled_lr",
    "scaled_warmup_steps",
    "ScheduleLR",
]


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _check_warmup(warmup_steps: int, total_steps: int | None = None) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}")


def constant_lr(step: int, *, lr_peak: float, warmup_steps: int = 0, **_: float) -> float:
    """``lr_peak`` after a linear warmup from 0 over ``warmup_steps``.

    >>> constant_lr(5, lr_peak=1.0, warmup_steps=10)
    0.5
    """
    _check_step(step)
    _check_warmup(warmup_steps)
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
    _check_step(step)
    _check_warmup(warmup_steps, total_steps)
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
    ``lr_final`` at ``total_steps`` (T), constant ``lr_final`` after T::

        η_t = η_init  + (η_peak − η_init)·(t / t_warmup)^p_warmup              for t ≤ t_warmup
        η_t = η_final + (η_peak − η_final)·((T − t)/(T − t_warmup))^p_decay    for t > t_warmup

    Table 3 (Nesterov): T = 2512, t_warmup = 706, η_peak = 7.05, η_final = 6·10⁻⁶, p_warmup = p_decay = 2.

    >>> polynomial_lr(706, total_steps=2512, warmup_steps=706, lr_peak=7.05, lr_final=6e-6, p_warmup=2.0)
    7.05
    >>> polynomial_lr(353, total_steps=2512, warmup_steps=706, lr_peak=7.05, lr_final=6e-6, p_warmup=2.0)
    1.7625
    """
    _check_step(step)
    _check_warmup(warmup_steps, total_steps)
    if p_warmup < 0 or p_decay < 0:
        raise ValueError(f"p_warmup and p_decay must be >= 0, got {p_warmup} and {p_decay}")
    t = min(step, total_steps)
    if t <= warmup_steps:
        frac = t / warmup_steps if warmup_steps > 0 else 1.0
        return lr_init + (lr_peak - lr_init) * frac**p_warmup
    frac = (total_steps - t) / (total_steps - warmup_steps)
    return lr_final + (lr_peak - lr_final) * frac**p_decay


def inverse_sqrt_lr(step: int, *, warmup_steps: int, lr_peak: float, lr_init: float = 0.0, **_: float) -> float:
    """Inverse square root with linear warmup (Vaswani et al. 2017, as in Lin et al. 2020 and §5.2):
    η_init → η_peak linearly over ``warmup_steps``, then η_peak·√(t_warmup / t).

    Vaswani's d_model^(-1/2)·min(t^(-1/2), t·t_warmup^(-3/2)) is this with η_peak = (d_model·t_warmup)^(-1/2).

    >>> inverse_sqrt_lr(4000, warmup_steps=4000, lr_peak=1e-3)
    0.001
    >>> inverse_sqrt_lr(16000, warmup_steps=4000, lr_peak=1e-3)
    0.0005
    """
    _check_step(step)
    _check_warmup(warmup_steps)
    if step < warmup_steps:
        return lr_init + (lr_peak - lr_init) * step / warmup_steps
    return lr_peak * math.sqrt(max(warmup_steps, 1) / max(step, 1))


def linear_scaled_lr(base_lr: float, batch_size: int, base_batch: int = 200) -> float:
    """The linear scaling rule (Goyal et al. 2017): η = η_base·B/B_base. Section 5.1 uses η_base = 0.1
    (SGD, LARS) and 10⁻³ (Adam, LAMB) per 200 samples.

    >>> linear_scaled_lr(0.1, 5000)
    2.5
    """
    if base_batch < 1 or batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, base_batch={base_batch}")
    return base_lr * batch_size / base_batch


def scaled_warmup_steps(batch_size: int, *, base_warmup: int = 4000, base_batch: int = 64) -> int:
    """Warmup steps "set to 4000 for the base batch size 64 and linearly decayed by the batch size"
    (Section 5.2): round(4000·64/B), at least 1 — the same number of warmup *samples* at every B.

    >>> scaled_warmup_steps(64), scaled_warmup_steps(2048)
    (4000, 125)
    """
    if batch_size < 1 or base_batch < 1 or base_warmup < 0:
        raise ValueError("batch_size and base_batch must be >= 1 and base_warmup >= 0")
    return max(1, round(base_warmup * base_batch / batch_size)) if base_warmup else 0


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant_lr,
    "cosine": cosine_lr,
    "poly": polynomial_lr,
    "rsqrt": inverse_sqrt_lr,
}


def build_schedule(name: str, **kwargs: Any) -> Callable[[int], float]:
    """The schedule ``name`` with its keyword arguments bound: a function step → learning rate.

    Keyword arguments a schedule does not take are ignored (so one call can serve every schedule).

    >>> build_schedule("cosine", total_steps=10, warmup_steps=2, lr_peak=0.1)(1)
    0.05
    >>> build_schedule("step")
    Traceback (most recent call last):
    ...
    ValueError: unknown schedule 'step'; valid: constant, cosine, poly, rsqrt
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    fn = SCHEDULES[name]
    if fn is polynomial_lr:
        allowed = {"total_steps", "warmup_steps", "lr_init", "lr_peak", "lr_final", "p_warmup", "p_decay"}
        kwargs = {k: v for k, v in kwargs.items() if k in allowed}
    bound = partial(fn, **kwargs)
    bound(0)  # validate the arguments now, not at the first optimizer step
    return bound


class ScheduleLR(torch.optim.lr_scheduler.LRScheduler):
    """A torch LR scheduler over a pure schedule: group i gets ``schedule(t)·scale_i`` at optimizer step t,
    where scale_i is the group's initial lr over the first group's (1 for the usual equal groups).

    Its ``state_dict`` holds only numbers (the schedule itself is rebuilt from the configuration), so it
    loads with ``torch.load(weights_only=True)``.

    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.SGD([w], lr=7.05)
    >>> sched = ScheduleLR(opt, build_schedule("poly", total_steps=2512, warmup_steps=706, lr_peak=7.05))
    >>> opt.param_groups[0]["lr"]
    0.0
    >>> for _ in range(706):
    ...     opt.step(); sched.step()
    >>> round(opt.param_groups[0]["lr"], 10)
    7.05
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float], last_epoch: int = -1):
        self.schedule = schedule
        lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.scales = [lr / lrs[0] if lrs[0] else 1.0 for lr in lrs]
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr = float(self.schedule(max(self.last_epoch, 0)))
        return [lr * s for s in self.scales]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in ("schedule", "scales")}
