"""Model plumbing: the BatchNorm mode of an estimate, the trainable parameters, the functional forward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gmix_curvature.errors import GmixError

__all__ = ["BN_MODES", "bn_mode_context", "trainable", "has_batchnorm", "check_bn_mode", "model_device_dtype"]

BN_MODES = ("eval", "train")


def check_bn_mode(bn_mode: str) -> str:
    if bn_mode not in BN_MODES:
        raise GmixError(f"unknown bn_mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    return bn_mode


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


@contextlib.contextmanager
def bn_mode_context(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration (dropout off, the model's modes restored on exit).

    ``bn_mode="eval"``: BatchNorm uses its running statistics, so per-sample terms are independent.
    ``bn_mode="train"``: BatchNorm normalises with the statistics of the batch (batch-coupled terms);
    its running statistics are set aside for the duration, so nothing is updated.
    """
    check_bn_mode(bn_mode)
    flags = {m: m.training for m in model.modules()}
    saved: dict[nn.Module, tuple] = {}
    try:
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    saved[m] = (m.running_mean, m.running_var, m.num_batches_tracked)
                    m.running_mean = m.running_var = m.num_batches_tracked = None
        yield model
    finally:
        for m, (mean, var, count) in saved.items():
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
        for m, flag in flags.items():
            m.training = flag


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters θ of G(θ): those with ``requires_grad``, by name (shared tensors once)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise GmixError("the model has no trainable parameters")
    return params


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()))
    return p.device, p.dtype
