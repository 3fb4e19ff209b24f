"""LARS, layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, Algorithm 1), as used for Table 3.

For each parameter tensor w (one "layer") with gradient g, weight decay λ, trust coefficient η and the
global learning rate γ_t of the schedule::

    τ = η·‖w‖ / (‖g‖ + λ‖w‖ + ε)        (local LR; τ = 1 when ‖w‖ = 0 or ‖g‖ = 0)
    v ← μ·v + γ_t·τ·(g + λ·w)
    w ← w − v

The learning rate sits *inside* the momentum buffer, as in the original Algorithm 1 and the MLPerf
reference LARS that Nado et al. (2021) tuned (and so Table 3's η_peak = 29 with η = 10⁻³). timm's
``Lars`` applies γ_t after the buffer (v ← μv + τ(g + λw); w ← w − γ_t v): the two agree at a constant
learning rate and differ while Eq. 15 moves γ_t, which is why this module exists.

With μ = 0 and λ = 0 the step is w ← w − γ_t·η‖w‖·g/‖g‖: Eq. 24 of Appendix B with φ(z) = η·z
(no clipping). Parameters of a group with ``adapt=False`` (biases and BatchNorm, by
:func:`~gmix_curvature.optim.factory.param_groups`) take the plain momentum step v ← μv + γ_t(g + λw).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["LARS"]


class LARS(Optimizer):
    """LARS of You et al. (2017), learning rate inside the momentum (module docstring).

    Args:
        params: parameters or parameter groups; a group may set ``adapt=False`` to skip the trust ratio.
        lr: the global learning rate γ (the schedule scales it).
        momentum: μ in [0, 1).
        weight_decay: λ ≥ 0, added to the gradient before the trust ratio is applied.
        trust_coefficient: η > 0 (10⁻³ in Section 5.1 and Table 3).
        eps: ε ≥ 0 in the trust ratio's denominator.
        adapt: whether the trust ratio is applied (default for groups that do not say).

    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> w.grad = torch.tensor([0.0, 2.0])
    >>> opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.1)
    >>> opt.step()
    >>> w.detach()  # τ = 0.1·5/2 = 0.25, so w − 0.25·g
    tensor([3.0000, 3.5000])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 0.0,
        adapt: bool = True,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not trust_coefficient > 0.0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            adapt=adapt,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One LARS step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                update = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if group["adapt"]:
                    # ref: You et al. (2017), Algorithm 1: local LR η‖w‖/(‖∇L‖ + β‖w‖)
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    update.mul_(ratio)
                update.mul_(lr)
                if mu != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(mu).add_(update)  # v ← μv + γτ(g + λw)
                    update = buf
                p.sub_(update)
        return loss
