"""γ₀, the initial scale of the final BatchNorm of each residual block (Section 5.3; Table 3).

Goyal et al. (2017) set it to 0 so that every block starts as the identity; Nado et al. (2021) tune it
(Table 3: 0.4138 for Nesterov, 0.0 for LARS). The "final BatchNorm" is the one whose output is added to
the shortcut: ``bn2`` of a basic block (the CIFAR ResNet-18 here and torchvision's ``BasicBlock``),
``bn3`` of torchvision's ``Bottleneck`` (ResNet-50).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gmix_curvature.errors import GmixError

__all__ = ["final_bn_layers", "apply_bn_gamma0"]


def final_bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The final BatchNorm of every residual block of ``model``, in module order.

    >>> from gmix_curvature.models import CifarResNet18
    >>> len(final_bn_layers(CifarResNet18(width=4)))
    8
    """
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    from gmix_curvature.models import BasicBlock

    layers = []
    for m in model.modules():
        if isinstance(m, TvBottleneck):
            layers.append(m.bn3)
        elif isinstance(m, (BasicBlock, TvBasic)):
            layers.append(m.bn2)
    return layers


@torch.no_grad()
def apply_bn_gamma0(model: nn.Module, gamma0: float) -> int:
    """Set the scale γ of the final BatchNorm of each residual block to ``gamma0``; returns how many.

    Raises :class:`~gmix_curvature.errors.GmixError` if the model has no residual block (so a preset
    meant for a ResNet fails loudly on another model).

    >>> from gmix_curvature.models import CifarResNet18
    >>> net = CifarResNet18(width=4)
    >>> apply_bn_gamma0(net, 0.5), net.layer1[0].bn2.weight.detach()
    (8, tensor([0.5000, 0.5000, 0.5000, 0.5000]))
    """
    if not math.isfinite(gamma0):
        raise GmixError(f"bn_gamma0 must be a finite number, got {gamma0}")
    layers = final_bn_layers(model)
    if not layers:
        raise GmixError(f"bn_gamma0 needs a ResNet: {type(model).__name__} has no residual blocks")
    for bn in layers:
        if bn.weight is None:
            raise GmixError("bn_gamma0 needs affine BatchNorm layers (affine=False has no scale γ)")
        bn.weight.fill_(gamma0)
    return len(layers)
