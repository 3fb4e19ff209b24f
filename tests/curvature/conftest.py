"""Cases as data for the curvature tests: small factories (model, data, seed) turned into parametrised
fixtures with readable ids, fresh and trained-to-confidence (mean top softmax probability >= 0.999).

Every case is float64 and in eval mode (BatchNorm on running statistics calibrated on the data), so
the dense references of ``gmix_curvature.curvature.reference`` are exact to rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from gmix_curvature.models import BasicBlock

CONFIDENCE = 0.999  # mean top softmax probability of the trained cases (the "confident")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[torch.Generator], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    n: int
    trained: bool = False
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.name}-{'trained' if self.trained else 'fresh'}"


def _tanh_mlp(g: torch.Generator) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 10))


def _relu_mlp(g: torch.Generator) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 10))


def _cnn_bn(g: torch.Generator) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


class TinyResNet(nn.Module):
    """A residual CNN with BatchNorm: stem, two basic blocks (one with a 1×1 projection), linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 6, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _resnet(g: torch.Generator) -> nn.Module:
    return TinyResNet()


FRESH = [
    Case("tanh_mlp", _tanh_mlp, (1, 4, 4), 10, 24),
    Case("relu_mlp", _relu_mlp, (1, 4, 4), 10, 24),
    Case("cnn_bn", _cnn_bn, (1, 8, 8), 5, 16),
    Case("resnet_bn", _resnet, (3, 6, 6), 5, 12),
]
TRAINED = [
    Case("tanh_mlp", _tanh_mlp, (1, 4, 4), 10, 32, trained=True),
    Case("cnn_bn", _cnn_bn, (1, 8, 8), 5, 24, trained=True),
]
ALL = FRESH + TRAINED


def _randomise_bn(model: nn.Module, x: torch.Tensor, g: torch.Generator) -> None:
    """Calibrate BatchNorm running statistics on x and give the affine parameters non-trivial values."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.momentum = None  # cumulative average: one pass gives the batch statistics
        with torch.no_grad():
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _train_to_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Adam in eval mode (BatchNorm statistics fixed) until the mean top probability reaches CONFIDENCE."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _step in range(3000):
        out = model(x)
        if torch.softmax(out, 1).max(1).values.mean() >= CONFIDENCE + 2e-4:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return _step


@functools.cache
def materialise(case: Case) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in eval mode, x, y), all float64, built from the case's seed (cached: treat as read-only)."""
    g = torch.Generator().manual_seed(case.seed)
    torch_state = torch.random.get_rng_state()
    try:
        torch.random.manual_seed(case.seed)  # nn.Module initialisers draw from the global RNG
        model = case.build(g).double()
    finally:
        torch.random.set_rng_state(torch_state)
    x = torch.randn((case.n, *case.input_shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, case.num_classes, (case.n,), generator=g)
    _randomise_bn(model, x, g)
    model.eval()
    if case.trained:
        _train_to_confidence(model, x, y)
        top = torch.softmax(model(x), 1).max(1).values.mean()
        assert top >= CONFIDENCE, f"{case.id} reached only {float(top):.5f}"
    for p in model.parameters():
        p.grad = None
    return model, x, y


def _fixture(cases: list[Case]):
    @pytest.fixture(params=cases, ids=[c.id for c in cases])
    def fixture(request: pytest.FixtureRequest) -> tuple[Case, nn.Module, torch.Tensor, torch.Tensor]:
        return (request.param, *materialise(request.param))

    return fixture


case = _fixture(ALL)
fresh_case = _fixture(FRESH)
trained_case = _fixture(TRAINED)
mlp_cases = _fixture([FRESH[0], TRAINED[0]])
