"""Tiny float64 models whose second-order products meet PyTorch's fused kernels (cases as data for the kernel
tests of test_model.py, test_hessian.py and test_eigen.py): the fast path of ``nn.TransformerEncoderLayer``
and ``nn.MultiheadAttention`` (no forward-mode derivative), flash attention on CPU (no second derivative),
``hardsigmoid`` in a squeeze-excitation block (no second derivative); and layers nothing routes around."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation


class EncoderClassifier(nn.Module):
    """Linear token embedding, one post-norm ``nn.TransformerEncoderLayer`` (fused fast path in eval mode),
    mean pooling, linear head."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        layer = nn.TransformerEncoderLayer(d, 2, 8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class SEClassifier(nn.Module):
    """Conv, hardswish, a squeeze-excitation block gated by hardsigmoid (MobileNetV3's), pooling, head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.Hardswish()
        self.se = SqueezeExcitation(4, 2, scale_activation=nn.Hardsigmoid)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.se(self.act(self.conv(x))).mean((2, 3)))


class RawGate(nn.Module):
    """hardsigmoid called as the ATen operation itself, out of reach of any Python-level routing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.hardsigmoid(x)


class Warp(nn.Module):
    """A fixed spatial warp by ``grid_sample``, which has no forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("theta", torch.tensor([[[0.9, 0.1, 0.0], [-0.1, 0.9, 0.05]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(self.theta.to(x).expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)


class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OnceSquare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OnceSquare.apply(x)


def mlp_with(layer: nn.Module, classes: int = 3) -> nn.Module:
    """Linear(8, 6) → ``layer`` → Linear(6, classes) on flat inputs of 8 features (``layer`` named "1")."""
    return nn.Sequential(nn.Linear(8, 6), layer, nn.Linear(6, classes))


def cnn_with(layer: nn.Module, classes: int = 3) -> nn.Module:
    """Conv2d(1, 2, 3) → ``layer`` → flatten → Linear on 1×6×6 images (``layer`` named "1")."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Flatten(), nn.Linear(32, classes))


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in eval mode, x, y), float64, seeded."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "transformer_encoder":
        model, x = EncoderClassifier(), torch.randn(6, 5, 3, generator=g)
    elif name == "squeeze_excitation":
        model, x = SEClassifier(), torch.randn(6, 1, 6, 6, generator=g)
    elif name == "raw_hardsigmoid":
        model, x = mlp_with(RawGate()), torch.randn(6, 8, generator=g)
    elif name == "once_differentiable":
        model, x = mlp_with(OnceSquare()), torch.randn(6, 8, generator=g)
    elif name == "grid_sample":
        model, x = cnn_with(Warp()), torch.randn(6, 1, 6, 6, generator=g)
    else:
        raise KeyError(name)
    return model.double().eval(), x.double(), torch.randint(0, 3, (x.shape[0],), generator=g)


ROUTED = ["transformer_encoder", "squeeze_excitation"]
