"""Each optimizer against its update formula (Eq. 13, Eq. 24, Appendix B.2, You et al. 2017/2019), in float64.

The reference implementations below are the formulas written out with numpy, one parameter tensor at a
time; the gradient is that of a fixed quadratic, so it depends on the iterate and errors compound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gmix_curvature.optim import LARS, OPTIMIZERS, build_optimizer, param_groups

LRS = [0.3, 0.5, 0.2, 0.4]  # a changing learning rate: the schedule moves it every step


class Tiny(nn.Module):
    """A weight matrix (decayed, adapted) and a bias (exempt)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64))


TARGET = {"weight": np.array([[0.5, 1.0, -1.0], [2.0, 0.0, 0.3]]), "bias": np.array([1.0, 1.0, -3.0])}
SCALE = {"weight": 3.0, "bias": 2.0}  # gradients of norm > 1, so LAMB's default global clipping would show


def grad_of(name: str, w: np.ndarray) -> np.ndarray:
    return SCALE[name] * (w - TARGET[name])


def run_torch(opt_name: str, lrs: list[float], **kw) -> dict[str, np.ndarray]:
    model = Tiny()
    opt = build_optimizer(opt_name, model, lr=lrs[0], **kw)
    for lr in lrs:
        for g in opt.param_groups:
            g["lr"] = lr
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(grad_of(name, p.detach().numpy()))
        opt.step()
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def ref_sgd(w, name, lrs, *, momentum, weight_decay, nesterov, **_):
    wd = weight_decay if name == "weight" else 0.0
    buf = np.zeros_like(w)
    for lr in lrs:
        d = grad_of(name, w) + wd * w
        buf = momentum * buf + d
        w = w - lr * (d + momentum * buf if nesterov else buf)
    return w


def ref_nesterov_eq13(w, name, lrs, *, momentum, **_):
    """Eq. 13 as printed: θ_{t+½} = θ_t + μv_t, v_{t+1} = μv_t − ηg(θ_{t+½}), θ_{t+1} = θ_t + v_{t+1}.
    torch stores the look-ahead point θ_{t+½}; this returns θ_T + μv_T (constant η)."""
    theta, v = w.copy(), np.zeros_like(w)
    for lr in lrs:
        half = theta + momentum * v
        v = momentum * v - lr * grad_of(name, half)
        theta = theta + v
    return theta + momentum * v


def ref_adam(w, name, lrs, *, betas, eps, weight_decay, decoupled=False, **_):
    b1, b2 = betas
    wd = weight_decay if name == "weight" else 0.0
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, lr in enumerate(lrs, start=1):
        g = grad_of(name, w) + (0.0 if decoupled else wd * w)
        if decoupled:
            w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


def ref_lars(w, name, lrs, *, momentum, weight_decay, trust_coefficient, eps, **_):
    """You et al. (2017) Algorithm 1: v ← μv + γ_t·τ·(g + λw), w ← w − v; exempt tensors: τ = 1, λ = 0."""
    adapt = name == "weight"
    wd = weight_decay if adapt else 0.0
    v = np.zeros_like(w)
    for lr in lrs:
        g = grad_of(name, w)
        tau = trust_coefficient * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w) + eps) if adapt else 1
        v = momentum * v + lr * tau * (g + wd * w)
        w = w - v
    return w


def ref_lamb(w, name, lrs, *, betas, eps, weight_decay, **_):
    """Appendix B.2 / You et al. (2019) Algorithm 2 with ε outside the root, φ(z) = z; exempt tensors: Adam."""
    adapt = name == "weight"
    wd = weight_decay if adapt else 0.0
    b1, b2 = betas
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, lr in enumerate(lrs, start=1):
        g = grad_of(name, w)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        u = r + wd * w
        ratio = np.linalg.norm(w) / np.linalg.norm(u) if adapt else 1.0
        w = w - lr * ratio * u
    return w


CASES = {
    "sgd": (ref_sgd, dict(momentum=0.9, weight_decay=0.1, nesterov=False), LRS),
    "nesterov": (ref_sgd, dict(momentum=0.97603, weight_decay=5.8e-2, nesterov=True), LRS),
    "nesterov-eq13": (ref_nesterov_eq13, dict(momentum=0.9, weight_decay=0.0), [0.05] * 4),
    "adam": (ref_adam, dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1), LRS),
    "adamw": (ref_adam, dict(betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, decoupled=True), LRS),
    "lars": (ref_lars, dict(momentum=0.929, weight_decay=1e-1, trust_coefficient=1e-3, eps=0.0), LRS),
    "lars-eq24": (ref_lars, dict(momentum=0.0, weight_decay=0.0, trust_coefficient=0.05, eps=0.0), LRS),
    "lamb": (ref_lamb, dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1), LRS),
    "lamb-nodecay": (ref_lamb, dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0), LRS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_formula(case):
    ref, kw, lrs = CASES[case]
    name = case.split("-")[0]
    kw_torch = {k: v for k, v in kw.items() if k not in ("nesterov", "decoupled")}
    got = run_torch(name, lrs, **kw_torch)
    start = {n: p.detach().numpy().copy() for n, p in Tiny().named_parameters()}
    for pname in ("weight", "bias"):
        want = ref(start[pname], pname, lrs, **kw)
        np.testing.assert_allclose(got[pname], want, rtol=1e-12, atol=1e-14, err_msg=f"{case}: {pname}")
        assert not np.allclose(got[pname], start[pname])  # the step did something


def test_lars_first_step_by_hand():
    """One step worked out on paper: w = (3, 4), g = (0, 2), λ = 0.5, η = 0.1, γ = 2.
    τ = 0.1·5/(2 + 0.5·5) = 1/9; update = γτ(g + λw) = (2/9)·(1.5, 4) = (1/3, 8/9)."""
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    LARS([{"params": [w], "weight_decay": 0.5}], lr=2.0, momentum=0.9, trust_coefficient=0.1).step()
    torch.testing.assert_close(w.detach(), torch.tensor([3 - 1 / 3, 4 - 8 / 9], dtype=torch.float64))


def test_lamb_first_step_by_hand():
    """First LAMB step: m̂ = g, v̂ = g², so r = g/(|g| + ε) ≈ sign(g); with λ = 0 the step is η·‖w‖·r/‖r‖."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    model.weight.grad = torch.tensor([[-10.0, 0.5]], dtype=torch.float64)
    build_optimizer("lamb", model, lr=0.1, eps=0.0, weight_decay=0.0).step()
    # r = (−1, 1), ‖r‖ = √2, ‖w‖ = 5: w − 0.1·5/√2·(−1, 1)
    s = 0.5 / 2**0.5
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[3 + s, 4 - s]], dtype=torch.float64))


def test_lars_equals_timm_lars_at_constant_lr():
    """A well-kept LARS (timm's, LR outside the momentum) gives the same iterates while the LR is constant."""
    from timm.optim import Lars

    ours, theirs = Tiny(), Tiny()
    kw = dict(momentum=0.9, trust_coefficient=1e-2)
    a = LARS(param_groups(ours, 0.1, adapt_key="adapt"), lr=0.5, **kw)
    b = Lars(param_groups(theirs, 0.1, adapt_key="always_adapt"), lr=0.5, momentum=0.9, trust_coeff=1e-2, eps=0.0)
    for _ in range(4):
        for model in (ours, theirs):
            for name, p in model.named_parameters():
                p.grad = torch.from_numpy(grad_of(name, p.detach().numpy()))
        a.step()
        b.step()
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


def test_exempt_parameters_of_a_convnet():
    """Biases and BatchNorm parameters land in the group without decay and without adaptation."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    opt = build_optimizer("lars", net, lr=1.0, weight_decay=1e-4)
    decayed, exempt = opt.param_groups
    assert (decayed["weight_decay"], decayed["adapt"], exempt["weight_decay"], exempt["adapt"]) == (1e-4, 1, 0, 0)
    assert {id(p) for p in exempt["params"]} == {
        id(p) for p in (net[0].bias, net[1].weight, net[1].bias, net[3].bias)
    }
    lamb = build_optimizer("lamb", net, lr=1.0, weight_decay=1e-2)
    assert [g["always_adapt"] for g in lamb.param_groups] == [True, False]
    assert lamb.defaults["max_grad_norm"] is None


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip(name):
    """Two steps, save, two more — equals four steps straight (what resume relies on)."""

    def steps(opt, model, n):
        for _ in range(n):
            for pname, p in model.named_parameters():
                p.grad = torch.from_numpy(grad_of(pname, p.detach().numpy()))
            opt.step()

    straight = Tiny()
    opt = build_optimizer(name, straight, lr=0.1, weight_decay=0.01)
    steps(opt, straight, 4)
    first = Tiny()
    opt1 = build_optimizer(name, first, lr=0.1, weight_decay=0.01)
    steps(opt1, first, 2)
    second = Tiny()
    second.load_state_dict(first.state_dict())
    opt2 = build_optimizer(name, second, lr=0.1, weight_decay=0.01)
    opt2.load_state_dict(opt1.state_dict())
    steps(opt2, second, 2)
    for p, q in zip(straight.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="rmsprop", lr=0.1), "unknown optimizer 'rmsprop'; valid: sgd"),
        (dict(name="sgd", lr=0.0), "lr must be > 0"),
        (dict(name="sgd", lr=0.1, momentum=1.0), r"momentum must lie in \[0, 1\)"),
        (dict(name="nesterov", lr=0.1, momentum=0.0), "nesterov needs momentum > 0"),
        (dict(name="adam", lr=0.1, betas=(0.9, 1.0)), "betas must be two numbers"),
        (dict(name="lamb", lr=0.1, eps=-1.0), "eps must be >= 0"),
        (dict(name="sgd", lr=0.1, weight_decay=-1.0), "weight_decay must be >= 0"),
        (dict(name="lars", lr=0.1, trust_coefficient=0.0), "trust_coefficient must be > 0"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, Tiny(), **kwargs)
