"""∇ mixed_loss == Σ_b π_b ∇ℓ_b (Eq. 4) against per-sample gradients computed one by one (float64)."""

import pytest
import torch
from torch import nn

from gmix_curvature.mixing import (
    device_mixed_loss,
    expand_group_weights,
    mixed_loss,
    per_sample_gradients_loop,
)
from gmix_curvature.models import MLP, DigitsCNN
from gmix_curvature.noise import sample_weights

CE = nn.CrossEntropyLoss(reduction="none")


def _mlp():
    return MLP(12, 4, hidden=(6, 5), activation="tanh")


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _bn_cnn():
    return DigitsCNN(num_classes=4, width=3)


CASES = {  # name -> (model factory, input shape, train mode)
    "mlp": (_mlp, (12,), False),
    "cnn": (_SmallCNN, (1, 4, 4), False),
    "cnn_batchnorm_train": (_bn_cnn, (1, 8, 8), True),
}


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "dirichlet"])
def test_mixed_gradient_equals_weighted_per_sample_gradients(name, kind):
    factory, shape, train_mode = CASES[name]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = factory().double().train(train_mode)
    B = 6
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (B,), generator=g)
    pi = sample_weights(kind, B, 0.1, g, dtype=torch.float64)

    reference = pi @ per_sample_gradients_loop(model, CE, x, y)  # Σ_b π_b ∇ℓ_b
    model.zero_grad()
    mixed_loss(CE(model(x), y), pi).backward()
    fast = _flat_grad(model)
    rel = (fast - reference).norm() / reference.norm()
    assert rel < 1e-10


def test_batchnorm_per_sample_gradient_depends_on_the_batch():
    """In train mode ∇ℓ_b is taken through the batch statistics: it changes when the other samples change."""
    torch.manual_seed(0)
    model = _bn_cnn().double().train()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    a = per_sample_gradients_loop(model, CE, x, y)[0]
    x2 = x.clone()
    x2[1:] += 1.0
    b = per_sample_gradients_loop(model, CE, x2, y)[0]
    assert (a - b).norm() > 1e-6 * a.norm()
    # and the loop leaves the running statistics as they were
    before = model.features[1].running_mean.clone()
    per_sample_gradients_loop(model, CE, x, y)
    assert torch.equal(model.features[1].running_mean, before)


def test_device_mixing_is_group_means_weighted():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    pi = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    expected = 0.5 * 1.5 + 0.2 * 3.5 + 0.3 * 5.5
    assert float(device_mixed_loss(losses, pi)) == pytest.approx(expected, rel=1e-15)
    # uniform group weights give the plain mean
    assert float(device_mixed_loss(losses, torch.full((3,), 1 / 3, dtype=torch.float64))) == pytest.approx(3.5)


def test_device_mixing_gradient_equals_eq3():
    torch.manual_seed(1)
    model = _mlp().double()
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 4, (8,))
    pi = sample_weights("gaussian", 4, 0.1, torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = per_sample_gradients_loop(model, CE, x, y)
    reference = sum(pi[k] * grads[2 * k : 2 * k + 2].mean(0) for k in range(4))  # Σ_k π_k (1/|k|) Σ_b ∇ℓ_b
    model.zero_grad()
    device_mixed_loss(CE(model(x), y), pi).backward()
    assert (_flat_grad(model) - reference).norm() / reference.norm() < 1e-12


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: mixed_loss(torch.zeros(3, 2), torch.zeros(3)), r"1-d tensor of per-sample losses"),
        (lambda: mixed_loss(torch.zeros(3), torch.zeros(4)), r"weights have shape \(4,\) but losses have shape \(3,\)"),
        (lambda: expand_group_weights(torch.ones(3) / 3, 8), "not divisible into 3 equal groups"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
