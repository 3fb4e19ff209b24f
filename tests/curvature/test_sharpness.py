"""Block traces and scale-invariant sharpness: the blocks sum to the total, and rescaling the weights
feeding a BatchNorm (with its running statistics and eps) leaves the function and the sharpness unchanged
while dividing their block trace by the square of the scale."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FRESH, TRAINED, materialise

from gmix_curvature.curvature import ggn_trace, scale_invariant_groups, scale_invariant_sharpness
from gmix_curvature.errors import GmixError
from gmix_curvature.models import CifarResNet18

ALPHA = 3.0
REL = 1e-8


@pytest.mark.parametrize("method", ["exact", "fisher_is", "output_hutchinson", "hutchinson"])
def test_block_traces_sum_to_the_total(method):
    model, x, y = materialise(FRESH[3])
    r = ggn_trace(model, (x, y), method, num_probes=4, generator=0)
    assert set(r.per_param) == {k for k, _ in model.named_parameters()}
    assert sum(r.per_param.values()) == pytest.approx(r.value, rel=1e-10)


def test_groups_are_found_from_the_module_graph():
    """Every convolution of the CIFAR ResNet-18 feeds a BatchNorm (stem, blocks, shortcuts); the head does not."""
    net = CifarResNet18(width=2).eval()
    groups = scale_invariant_groups(net, torch.zeros(2, 3, 32, 32))
    convs = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(groups) == sorted(convs) and len(convs) == 20
    assert "fc" not in groups


@pytest.mark.parametrize("case", [FRESH[2], TRAINED[1]], ids=lambda c: c.id)
def test_rescaling_the_weights_feeding_batchnorm(case):
    model, x, y = materialise(case)
    scaled = copy.deepcopy(model)
    conv, bn = scaled[0], scaled[1]  # Conv2d(1, 4) with bias → BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.mul_(ALPHA)
        conv.bias.mul_(ALPHA)
        bn.running_mean.mul_(ALPHA)
        bn.running_var.mul_(ALPHA**2)
    bn.eps *= ALPHA**2
    torch.testing.assert_close(scaled(x), model(x), rtol=1e-12, atol=1e-12)  # eval-mode function unchanged
    before = scale_invariant_sharpness(model, (x, y))
    after = scale_invariant_sharpness(scaled, (x, y))
    for name in ("0.weight", "0.bias"):
        assert after.per_param[name] == pytest.approx(before.per_param[name] / ALPHA**2, rel=REL)
    assert after.value == pytest.approx(before.value, rel=REL)
    assert after.extra["weight_norms2"]["0"] == pytest.approx(before.extra["weight_norms2"]["0"] * ALPHA**2, rel=REL)
    assert sorted(after.extra["groups"]) == ["0", "4"]
    assert after.quantity == "scale_invariant_sharpness" and after.stderr is None


def test_stochastic_sharpness_has_a_stderr():
    model, x, y = materialise(FRESH[2])
    exact = scale_invariant_sharpness(model, (x, y)).value
    r = scale_invariant_sharpness(model, (x, y), method="fisher_is", num_probes=16, generator=0)
    assert r.stderr > 0 and abs(r.value - exact) < 4 * r.stderr


def test_no_normalisation_layers():
    model, x, y = materialise(FRESH[0])
    with pytest.raises(GmixError, match="no parameters feeding a normalisation layer"):
        scale_invariant_sharpness(model, (x, y))
