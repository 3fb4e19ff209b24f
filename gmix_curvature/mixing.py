"""GradientMix itself: the mixed gradient Σ_b π_b ∇ℓ_b (Eq. 4) and its device-wise form (Eq. 3).

Both are gradients of a weighted loss, so they cost one ordinary backward pass and never form
per-sample gradients: by linearity ∇_θ Σ_b π_b ℓ_b(θ) = Σ_b π_b ∇_θ ℓ_b(θ).

BatchNorm in train mode. With batch statistics every ℓ_b depends on the whole batch, and the
"per-sample gradient" ∇ℓ_b is the gradient of sample b's loss *through the batch statistics*
(the batch held fixed). The identity above still holds exactly in that sense, and it is what
:func:`per_sample_gradients_loop` computes; the tests check it for a CNN with BatchNorm.

The reference :func:`per_sample_gradients_loop` (one backward pass per sample, obviously correct and
slow) is kept in the package for the tests and for users who want to check their own model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "mixed_loss",
    "expand_group_weights",
    "device_mixed_loss",
    "per_sample_gradients_loop",
]


def mixed_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_b π_b ℓ_b over per-sample losses (``reduction='none'``): its gradient is Eq. 4's g_final.

    With π_b = 1/B this is the ordinary mean loss.

    >>> mixed_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25, 0.25]))
    tensor(1.7500)
    """
    if losses.dim() != 1:
        raise ValueError(
            f"losses must be a 1-d tensor of per-sample losses (reduction='none'), "
            f"got shape {tuple(losses.shape)}"
        )
    if weights.shape != losses.shape:
        raise ValueError(
            f"weights have shape {tuple(weights.shape)} but losses have shape {tuple(losses.shape)}"
        )
    return (weights.to(device=losses.device, dtype=losses.dtype) * losses).sum()


def expand_group_weights(group_weights: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-sample weights that make Σ_b w_b ℓ_b equal Eq. 3's Σ_k π_k · mean_{b ∈ group k} ℓ_b.

    The batch is cut into K = len(group_weights) equal, contiguous groups (one per virtual device);
    sample b of group k gets w_b = π_k·K/B.

    >>> expand_group_weights(torch.tensor([0.75, 0.25]), 4)
    tensor([0.3750, 0.3750, 0.1250, 0.1250])
    """
    k = group_weights.numel()
    if k < 1 or batch_size % k != 0:
        raise ValueError(f"batch_size={batch_size} is not divisible into {k} equal groups")
    return group_weights.repeat_interleave(batch_size // k) * (k / batch_size)


def device_mixed_loss(losses: torch.Tensor, group_weights: torch.Tensor) -> torch.Tensor:
    """Eq. 3 in one process: Σ_k π_k · (mean loss of group k), groups contiguous and equal in size.

    >>> device_mixed_loss(torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0.5, 0.5]))
    tensor(2.)
    """
    return mixed_loss(losses, expand_group_weights(group_weights, losses.numel()))


def per_sample_gradients_loop(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """Reference per-sample gradients, one backward pass per sample: a (B, d) tensor of ∇_θ ℓ_b.

    Obviously correct but slow; for tests. ``loss_fn`` must return per-sample losses
    (``reduction='none'``). The whole batch is forwarded each time, so with BatchNorm in train mode
    row b is the gradient of ℓ_b through the batch statistics (see the module docstring). Running
    statistics of BatchNorm are restored afterwards, so the model is left as it was.

    >>> model = nn.Linear(3, 2)
    >>> grads = per_sample_gradients_loop(model, nn.CrossEntropyLoss(reduction="none"),
    ...                                   torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    >>> tuple(grads.shape)
    (5, 8)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rows = []
    for b in range(x.shape[0]):
        losses = loss_fn(model(x), y)
        grads = torch.autograd.grad(losses[b], params, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            )
        )
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return torch.stack(rows)
