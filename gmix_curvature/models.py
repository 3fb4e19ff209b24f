"""Models: a small CNN for the embedded digits, a 1-D CNN for MNIST-1D, the CIFAR ResNet-18, ResNet-50, an MLP
for tests, and the Transformer-base of Section 5.2 (:mod:`gmix_curvature.transformer`).

``build_model(name, num_classes=..., input_shape=...)`` is the one entry point; ``MODELS`` lists the
names. ``torchvision:NAME`` builds any torchvision classification model (no weights are downloaded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLP", "DigitsCNN", "Mnist1dCNN", "BasicBlock", "CifarResNet18", "build_model", "MODELS"]


class MLP(nn.Module):
    """A fully connected network: flatten → (Linear → activation) × depth → Linear.

    >>> MLP(4, 3, hidden=(8,))(torch.zeros(2, 4)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (32, 32),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        acts: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(acts)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), acts[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """Two conv blocks (Conv3×3 → BatchNorm → ReLU → MaxPool2) and a linear head, for 8×8 digits.

    About 6k parameters at the default width 16: small enough for exact curvature on a laptop CPU.

    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Mnist1dCNN(nn.Module):
    """Three conv blocks (Conv1d → BatchNorm1d → ReLU, each halving the length) and a linear head, for the
    40-point signals of MNIST-1D (Greydanus 2020, whose baseline CNN has three Conv1d layers; BatchNorm is
    added here so that the conv weights are scale-invariant, as in the ResNet-18 of Table 1).

    About 8k parameters at the default width 32: exact curvature on the 1,000 test signals takes seconds.

    >>> Mnist1dCNN()(torch.zeros(2, 1, 40)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, length: int = 40) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        )
        out_len = length
        for _ in range(3):
            out_len = (out_len + 1) // 2
        self.classifier = nn.Linear(width * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """The ResNet basic block (two 3×3 convolutions with BatchNorm and an identity/1×1 shortcut).

    ``bn2`` is the final BatchNorm of the block, whose initial scale is γ₀ of Table 3.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (He et al. 2016 as used for CIFAR): a 3×3 stem, no max-pool,
    four stages of two basic blocks with widths w, 2w, 4w, 8w (w = 64 gives the standard 64–512).

    >>> CifarResNet18(width=8)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        in_planes = width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


def _mlp(num_classes: int, input_shape: Sequence[int], **kw) -> nn.Module:
    in_features = 1
    for s in input_shape:
        in_features *= int(s)
    return MLP(in_features, num_classes, **kw)


def _digits_cnn(num_classes: int, input_shape: Sequence[int], **kw) -> nn.Module:
    return DigitsCNN(num_classes, in_channels=int(input_shape[0]), **kw)


def _mnist1d_cnn(num_classes: int, input_shape: Sequence[int], **kw) -> nn.Module:
    if len(input_shape) != 2:
        raise ValueError(f"mnist1d_cnn needs inputs of shape (channels, length), got {tuple(input_shape)}")
    return Mnist1dCNN(num_classes, in_channels=int(input_shape[0]), length=int(input_shape[1]), **kw)


def _resnet18(num_classes: int, input_shape: Sequence[int], **kw) -> nn.Module:
    return CifarResNet18(num_classes, in_channels=int(input_shape[0]), **kw)


def _resnet50(num_classes: int, input_shape: Sequence[int], **kw) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kw)


def _transformer(num_classes: int, input_shape: Sequence[int], **kw) -> nn.Module:
    from gmix_curvature.transformer import build_transformer

    return build_transformer(num_classes, input_shape, **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "digits_cnn": _digits_cnn,
    "mnist1d_cnn": _mnist1d_cnn,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "transformer": _transformer,
}


def build_model(
    name: str, *, num_classes: int, input_shape: Sequence[int] = (3, 32, 32), **kwargs
) -> nn.Module:
    """Build a model by name: one of ``MODELS`` or ``torchvision:NAME`` (random initialisation).

    ``kwargs`` go to the model (``width`` for ``digits_cnn``, ``mnist1d_cnn`` and ``resnet18``, ``hidden`` and
    ``activation`` for ``mlp``).

    >>> build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8)).__class__.__name__
    'DigitsCNN'
    >>> build_model("lenet", num_classes=10)  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'lenet'; valid: mlp, digits_cnn, mnist1d_cnn, resnet18, resnet50, transformer,
    torchvision:NAME
    """
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        try:
            return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
        except ValueError as exc:
            raise ValueError(f"unknown torchvision model {tv_name!r}: {exc}") from None
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}, torchvision:NAME")
    return MODELS[name](num_classes, tuple(input_shape), **kwargs)
