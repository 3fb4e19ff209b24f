"""Normalisation layers: LayerNorm, RMSNorm, GroupNorm, and BatchNorm on running statistics (eval mode).

Each is y = x̂ ⊙ γ + β with x̂ the normalised input (recomputed from the recorded input), so the per-sample
gradients are ∂γ = Σ g ⊙ x̂ and ∂β = Σ g over the sample's positions (the sums over t and space of Opacus'
``layer_norm.py`` / ``group_norm.py``), of the size of γ: nothing larger than a layer's parameters per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gmix_curvature.curvature._rules import LayerRule, Record, register


def _affine(rec: Record, xhat: torch.Tensor, g: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-sample ∂γ = Σ g ⊙ x̂ and ∂β = Σ g, summed over all but the parameter's dims, as (N, *shape)."""
    m, n = rec.module, rec.n
    out = {}
    if getattr(m, "weight", None) is not None:
        out["weight"] = (g * xhat).reshape(n, -1, *shape).sum(1)
    if getattr(m, "bias", None) is not None:
        out["bias"] = g.reshape(n, -1, *shape).sum(1)
    return out


def _squared(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(v.shape[0], -1).square().sum(1) for k, v in grads.items()}


class LayerNormRule(LayerRule):
    name = "layer_norm"
    classes = (nn.LayerNorm,)

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m = rec.module
        xhat = rec.keep("xhat", lambda: F.layer_norm(rec.a, m.normalized_shape, None, None, m.eps))
        return _affine(rec, xhat, rec.g, tuple(m.normalized_shape))

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        return _squared(self.grads(rec))


class ChannelsFirstLayerNormRule(LayerNormRule):
    """torchvision's LayerNorm2d (ConvNeXt): a LayerNorm over the channels of an (N, C, H, W) input."""

    name = "layer_norm_2d"

    def applies(self, m: nn.Module) -> bool:
        cls = type(m)
        return (
            cls.__name__ == "LayerNorm2d"
            and cls.__module__.startswith("torchvision.")
            and all(k in self.param_names for k, _ in m.named_parameters(recurse=False))
        )

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m = rec.module
        x, g = rec.a.movedim(1, -1), rec.g.movedim(1, -1)
        xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return _affine(rec, xhat, g, tuple(m.normalized_shape))


class RMSNormRule(LayerRule):
    name = "rms_norm"
    classes = (nn.RMSNorm,)

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m = rec.module
        xhat = rec.keep("xhat", lambda: F.rms_norm(rec.a, m.normalized_shape, None, m.eps))
        return _affine(rec, xhat, rec.g, tuple(m.normalized_shape))

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        return _squared(self.grads(rec))


class GroupNormRule(LayerRule):
    name = "group_norm"
    classes = (nn.GroupNorm,)

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m, n = rec.module, rec.n
        xhat = rec.keep("xhat", lambda: F.group_norm(rec.a, m.num_groups, None, None, m.eps))
        c = rec.a.shape[1]
        # channels second: move them last so that γ's dim is the trailing one
        xt = xhat.reshape(n, c, -1).transpose(1, 2)
        gt = rec.g.reshape(n, c, -1).transpose(1, 2)
        return _affine(rec, xt, gt, (c,))

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        return _squared(self.grads(rec))


class BatchNormRule(LayerRule):
    """Eval mode only (running statistics): in train mode the samples of a batch are not independent."""

    name = "batch_norm"
    classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

    def applies(self, m: nn.Module) -> bool:
        return isinstance(m, _BatchNorm) and super().applies(m) and m.running_mean is not None

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m, n = rec.module, rec.n
        a = rec.a
        ch = a.shape[1]
        shape = (1, ch) + (1,) * (a.ndim - 2)
        xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
        xt = xhat.reshape(n, ch, -1).transpose(1, 2)
        gt = rec.g.reshape(n, ch, -1).transpose(1, 2)
        return _affine(rec, xt, gt, (ch,))

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        m, n = rec.module, rec.n
        a = rec.a
        ch = a.shape[1]
        shape = (1, ch) + (1,) * (a.ndim - 2)
        xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
        out = {}
        if m.weight is not None:
            out["weight"] = (rec.g * xhat).reshape(n, ch, -1).sum(-1).square().sum(1)
        if m.bias is not None:
            out["bias"] = rec.g.reshape(n, ch, -1).sum(-1).square().sum(1)
        return out


register(LayerNormRule())
register(ChannelsFirstLayerNormRule())
register(RMSNormRule())
register(GroupNormRule())
register(BatchNormRule())
