"""γ₀ of Table 3: the final BatchNorm of each residual block, for the CIFAR ResNet-18 and ResNet-50."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmix_curvature.errors import GmixError
from gmix_curvature.models import build_model
from gmix_curvature.optim import apply_bn_gamma0, final_bn_layers


@pytest.mark.parametrize(
    "name, kwargs, blocks, attr",
    [("resnet18", dict(width=4), 8, "bn2"), ("resnet50", {}, 16, "bn3"), ("torchvision:resnet18", {}, 8, "bn2")],
)
def test_gamma0_sets_exactly_the_final_bn(name, kwargs, blocks, attr):
    model = build_model(name, num_classes=10, **kwargs)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert apply_bn_gamma0(model, 0.4138) == blocks
    finals = {id(m) for m in final_bn_layers(model)}
    for n, m in model.named_modules():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        if id(m) in finals:
            assert n.endswith(attr)
            assert torch.all(m.weight == torch.tensor(0.4138)), n
        else:
            assert torch.equal(m.weight, before[n]), n  # every other BN untouched


def test_gamma0_zero_makes_blocks_start_as_identity_branches():
    model = build_model("resnet18", num_classes=10, width=4)
    apply_bn_gamma0(model, 0.0)
    block = model.layer1[0].eval()
    x = torch.randn(2, 4, 8, 8).relu()
    torch.testing.assert_close(block(x), torch.relu(x + block.bn2.bias.view(1, -1, 1, 1)))


def test_gamma0_needs_a_resnet():
    with pytest.raises(GmixError, match="bn_gamma0 needs a ResNet: MLP has no residual blocks"):
        apply_bn_gamma0(build_model("mlp", num_classes=3, input_shape=(4,)), 0.0)
    with pytest.raises(GmixError, match="finite"):
        apply_bn_gamma0(build_model("resnet18", num_classes=3, width=4), float("nan"))
