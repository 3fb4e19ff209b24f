"""The closed forms of gmix_curvature.theory against brute-force enumeration, dense references and simulation."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from gmix_curvature.mixing import per_sample_gradients_loop
from gmix_curvature.noise import expected_gamma, kappa_from_ratio, sample_weights
from gmix_curvature.theory import (
    NoisyQuadratic,
    critical_batch_steps,
    eq18_second_moment,
    expected_mixed_gradient_norm,
    expected_weight_sum_sq,
    expected_zeta,
    fit_critical_batch,
    gamma_variance,
    gradient_noise_scale,
    mixed_noise_scale,
    mixed_noise_trace,
    per_sample_gradients,
    second_moment,
    theorem1_batch_condition,
    theorem1_bound,
    theorem1_rate,
    theorem1_step_limit,
    theorem1_tuned_step,
)

Z = 4.0  # Monte Carlo tolerance in standard errors
N_DRAWS = 20_000
KINDS = ["none", "gaussian", "rademacher", "dirichlet"]


def _data(n, d, seed, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def _moments(data):
    mean = data.mean(0)
    return float(mean @ mean), float((data - mean).square().sum(1).mean())


# ---------------------------------------------------------------- second moment: exact enumeration


ENUM_CASES = [  # (n data vectors, B, κ)
    (3, 1, 0.7),
    (2, 2, 0.3),
    (3, 3, 0.1),
    (2, 4, 0.45),
]


@pytest.mark.parametrize("n,B,kappa", ENUM_CASES, ids=[f"n{n}-B{b}" for n, b, _ in ENUM_CASES])
def test_second_moment_equals_rademacher_enumeration(n, B, kappa):
    """All n^B batches (drawn with replacement) × all 2^B sign patterns, each equally likely."""
    data = _data(n, 3, seed=n * 10 + B)
    total = 0.0
    for idx in itertools.product(range(n), repeat=B):
        for signs in itertools.product((-1.0, 1.0), repeat=B):
            pi = 1.0 / B + kappa * torch.tensor(signs, dtype=torch.float64)
            g = pi @ data[list(idx)]
            total += float(g @ g)
    enumerated = total / (n**B * 2**B)
    g2, s2 = _moments(data)
    assert second_moment("rademacher", B, kappa, g2, s2) == pytest.approx(enumerated, rel=1e-12)
    # Eq. 18 as printed misses exactly Bκ²‖∇f‖²
    missing = second_moment("rademacher", B, kappa, g2, s2) - eq18_second_moment("rademacher", B, kappa, g2, s2)
    assert missing == pytest.approx(B * kappa**2 * g2, rel=1e-12)
    assert missing > 0


def test_second_moment_none_is_plain_sgd():
    assert second_moment("none", 8, 0.3, grad_norm_sq=2.0, sigma_sq=4.0) == pytest.approx(2.0 + 4.0 / 8)


@pytest.mark.parametrize("kind", ["none", "dirichlet"])
def test_eq18_is_exact_for_unit_sum_weights(kind):
    args = (kind, 6, 0.1, 1.5, 3.0)
    assert eq18_second_moment(*args) == second_moment(*args)


MC_CASES = [("gaussian", 4, 0.5), ("rademacher", 3, 0.4), ("dirichlet", 5, 0.12), ("none", 4, 0.0)]


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind,B,kappa", MC_CASES, ids=[c[0] for c in MC_CASES])
def test_second_moment_against_simulation_with_the_real_sampler(kind, B, kappa):
    """Batches with replacement from a small data set, weights from noise.sample_weights (one call per draw)."""
    data = _data(7, 4, seed=1)
    g2, s2 = _moments(data)
    gen = torch.Generator().manual_seed(2)
    n = 5_000
    idx = torch.randint(0, data.shape[0], (n, B), generator=gen)
    pi = torch.stack([sample_weights(kind, B, kappa, gen, dtype=torch.float64) for _ in range(n)])
    g = torch.einsum("mb,mbd->md", pi, data[idx])
    sq = g.square().sum(1)
    dev = (g - data.mean(0)).square().sum(1)
    se, se_dev = float(sq.std()) / math.sqrt(n), float(dev.std()) / math.sqrt(n)
    assert abs(float(sq.mean()) - second_moment(kind, B, kappa, g2, s2)) <= Z * se
    assert abs(float(dev.mean()) - mixed_noise_trace(kind, B, kappa, g2, s2)) <= Z * se_dev
    if kind == "gaussian":  # the printed form is far outside the interval here
        assert abs(float(sq.mean()) - eq18_second_moment(kind, B, kappa, g2, s2)) > Z * se


# ---------------------------------------------------------------- moments of the weights


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind,B,kappa", [("gaussian", 4, 0.3), ("rademacher", 6, 0.2), ("dirichlet", 5, 0.15)])
def test_weight_moments_against_simulation(kind, B, kappa):
    gen = torch.Generator().manual_seed(3)
    n = 10_000
    pi = torch.stack([sample_weights(kind, B, kappa, gen, dtype=torch.float64) for _ in range(n)])
    gam = B * pi.square().sum(1)
    s2 = pi.sum(1).square()
    assert abs(float(gam.mean()) - expected_gamma(kind, B, kappa)) <= Z * math.sqrt(gamma_variance(kind, B, kappa) / n)
    assert float(gam.mean()) / B == pytest.approx(expected_zeta(kind, B, kappa), abs=Z * float(gam.std()) / B / n**0.5)
    dev = (gam - expected_gamma(kind, B, kappa)).square()  # variance about the known mean
    assert abs(float(dev.mean()) - gamma_variance(kind, B, kappa)) <= Z * float(dev.std()) / math.sqrt(n)
    se_s2 = float(s2.std()) / math.sqrt(n)
    assert abs(float(s2.mean()) - expected_weight_sum_sq(kind, B, kappa)) <= Z * se_s2 + 1e-12


def test_weight_moments_golden_values():
    assert expected_weight_sum_sq("gaussian", 8, 0.25) == 1.5
    assert expected_weight_sum_sq("dirichlet", 8, 0.25) == 1.0
    assert expected_zeta("rademacher", 8, kappa_from_ratio(2.0, 8)) == pytest.approx(5.0 / 8)
    assert gamma_variance("none", 8, 0.3) == 0.0
    assert gamma_variance("gaussian", 4, 0.0) == 0.0
    assert gamma_variance("rademacher", 2, 0.5) == pytest.approx(2.0)


def test_dirichlet_gamma_variance_matches_exact_moments_for_b2():
    """B = 2: π_1 ~ Beta(α, α) and γ = 2(π_1² + (1 − π_1)²), whose variance follows from Beta moments."""
    kappa = 0.2
    a = ((2 - 1) / (4 * kappa**2) - 1.0) / 2
    m = [1.0]
    for k in range(1, 5):  # E[π^k] of Beta(a, a)
        m.append(m[-1] * (a + k - 1) / (2 * a + k - 1))
    # γ = 2(2π² − 2π + 1) = 4π² − 4π + 2
    e_g = 4 * m[2] - 4 * m[1] + 2
    e_g2 = 16 * m[4] - 32 * m[3] + (16 + 16) * m[2] - 16 * m[1] + 4
    assert gamma_variance("dirichlet", 2, kappa) == pytest.approx(e_g2 - e_g**2, rel=1e-10)
    assert expected_gamma("dirichlet", 2, kappa) == pytest.approx(e_g, rel=1e-12)


# ---------------------------------------------------------------- trace link (Eq. 9-10)


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "dirichlet"])
def test_expected_mixed_gradient_norm_against_simulation(kind):
    n = 6
    A = _data(n, 3, seed=4).T  # d × n, columns are per-sample gradients
    kappa = 0.08
    gen = torch.Generator().manual_seed(5)
    z = torch.stack([sample_weights(kind, n, kappa, gen, dtype=torch.float64) for _ in range(N_DRAWS)])
    q = (z @ A.T).square().sum(1)
    mean_norm_sq = float((A.mean(1)).square().sum())
    exp = expected_mixed_gradient_norm(kind, n, kappa, mean_norm_sq, float((A * A).sum()))
    assert abs(float(q.mean()) - exp) <= Z * float(q.std()) / math.sqrt(N_DRAWS)


def test_expected_mixed_gradient_norm_is_eq10_for_isotropic_weights():
    assert expected_mixed_gradient_norm("gaussian", 10, 0.1, 2.0, 30.0) == pytest.approx(2.0 + 0.01 * 30.0)
    assert expected_mixed_gradient_norm("none", 10, 0.1, 2.0, 30.0) == 2.0


# ---------------------------------------------------------------- Theorem 1


def test_step_limit_golden_and_correction():
    assert theorem1_step_limit(2.0, 0.5) == pytest.approx(2 * 0.25 / (2 * 1.125))
    # the correction only shrinks the range, by μ³ + 1 + Bκ² instead of μ³ + 1
    lim = theorem1_step_limit(1.0, 0.5, "gaussian", 4, 0.5)
    assert lim == pytest.approx(2 * 0.25 / (0.125 + 2.0))
    assert lim < theorem1_step_limit(1.0, 0.5, "gaussian", 4, 0.5, printed=True)
    assert theorem1_step_limit(1.0, 0.5, "dirichlet", 4, 0.1) == theorem1_step_limit(1.0, 0.5, printed=True)


def test_bound_is_infinite_at_and_beyond_the_limit():
    kw = {"L": 1.0, "delta": 3.0, "sigma_sq": 2.0, "steps": 50, "mu": 0.3, "kind": "rademacher", "batch_size": 2,
          "kappa": 0.4}
    lim = theorem1_step_limit(1.0, 0.3, "rademacher", 2, 0.4)
    assert theorem1_bound(eta=lim, **kw) == math.inf
    assert math.isfinite(theorem1_bound(eta=0.999 * lim, **kw))
    assert theorem1_bound(eta=lim, **kw, printed=True) < math.inf  # the printed range is wider


def test_bound_golden_value():
    # [Δ(1−μ)/(ηT) + ηLγ̄σ²/(2(1−μ)²B)] / [1 − Lη(μ³+c)/(2(1−μ)²)] with γ̄ = 2, c = 1.25 (B = 4, κ = 1/4)
    got = theorem1_bound(L=2.0, delta=1.0, sigma_sq=3.0, steps=10, eta=0.1, mu=0.5, kind="gaussian", batch_size=4,
                         kappa=0.25)
    num = 1.0 * 0.5 / (0.1 * 10) + 0.1 * 2.0 * 2.0 * 3.0 / (2 * 0.25 * 4)
    den = 1 - 2.0 * 0.1 * (0.125 + 1.25) / (2 * 0.25)
    assert got == pytest.approx(num / den, rel=1e-14)


def test_tuned_step_minimises_psi_and_gives_eq22():
    kw = {"L": 2.0, "delta": 3.0, "sigma_sq": 5.0, "steps": 400, "mu": 0.7, "gamma_bar": 3.0, "batch_size": 8}
    eta = theorem1_tuned_step(**kw)

    def psi(e):
        return 3.0 * 0.3 / (e * 400) + e * 2.0 * 3.0 * 5.0 / (2 * 0.09 * 8)

    assert psi(eta) == pytest.approx(theorem1_rate(**kw)[1], rel=1e-12)
    assert psi(eta) < min(psi(eta * 1.01), psi(eta * 0.99))


def test_batch_condition_is_where_the_two_terms_meet():
    kw = {"L": 2.0, "delta": 3.0, "sigma_sq": 5.0, "steps": 400, "mu": 0.7, "gamma_bar": 3.0}
    b = theorem1_batch_condition(**kw)
    first, second = theorem1_rate(batch_size=b, **kw)
    assert first == pytest.approx(second, rel=1e-12)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: theorem1_step_limit(1.0, 1.0), "mu must lie in"),
        (lambda: theorem1_step_limit(0.0, 0.5), "L must be > 0"),
        (lambda: theorem1_bound(L=1, delta=1, sigma_sq=1, steps=0, eta=0.1, mu=0), "steps must be >= 1"),
        (lambda: theorem1_bound(L=1, delta=1, sigma_sq=1, steps=5, eta=-0.1, mu=0), "eta must be > 0"),
        (lambda: second_moment("uniform", 4, 0.1, 1.0, 1.0), "unknown noise kind 'uniform'"),
        (lambda: second_moment("gaussian", 4, 0.1, -1.0, 1.0), "grad_norm_sq must be a finite number >= 0"),
        (lambda: second_moment("dirichlet", 4, 0.5, 1.0, 1.0), "simplex weights need kappa <"),
        (lambda: expected_zeta("gaussian", 0, 0.1), "batch_size must be an integer >= 1"),
        (lambda: mixed_noise_scale(1.0, "gaussian", -1.0), "ratio must be a finite number >= 0"),
        (lambda: fit_critical_batch([1, 2], [1.0]), "needs >= 2 finite positive"),
        (lambda: NoisyQuadratic((1.0,), (1.0, 2.0), (1.0,)), "of one length"),
        (lambda: NoisyQuadratic.standard(dim=0), "need dim >= 1"),
    ],
    ids=["mu", "L", "steps", "eta", "kind", "negative", "dirichlet", "batch", "ratio", "fit", "nqm", "nqm-dim"],
)
def test_error_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- the noisy quadratic, exact recursion


def test_nqm_recursion_without_noise_is_the_deterministic_iteration():
    q = NoisyQuadratic((1.0, 0.3, 0.05), (0.0, 0.0, 0.0), (1.0, -2.0, 0.5))
    eta, mu, T = 0.4, 0.6, 30
    out = q.expected_trajectory(eta=eta, mu=mu, steps=T)
    h, _, e = (torch.tensor(a) for a in q.arrays())
    v = torch.zeros(3, dtype=torch.float64)
    for t in range(T):
        x = e + mu * v
        assert out["grad_norm_sq"][t] == pytest.approx(float((h * x).square().sum()), rel=1e-12)
        assert out["loss_gap"][t] == pytest.approx(float(0.5 * (h * e * e).sum()), rel=1e-12)
        v = mu * v - eta * h * x
        e = e + v


def test_nqm_recursion_second_moments_by_enumeration():
    """One coordinate, Rademacher weights at B = 1 (s = 1 ± κ) and ±1 noise: enumerate all 2^(2T) paths."""
    h, sig2, e0, eta, mu, kappa, T = 0.8, 0.5, 1.3, 0.3, 0.5, 0.6, 4
    q = NoisyQuadratic((h,), (sig2,), (e0,))
    out = q.expected_trajectory(eta=eta, mu=mu, steps=T, kind="rademacher", batch_size=1, kappa=kappa)
    acc = np.zeros(T)
    paths = list(itertools.product((-1.0, 1.0), repeat=2 * T))
    for path in paths:
        e, v = e0, 0.0
        for t in range(T):
            x = e + mu * v
            acc[t] += (h * x) ** 2
            s = 1.0 + kappa * path[2 * t]
            pi = s  # B = 1: π = s, ζ = s²
            g = s * h * x + pi * math.sqrt(sig2) * path[2 * t + 1]
            v = mu * v - eta * g
            e = e + v
    np.testing.assert_allclose(out["grad_norm_sq"], acc / len(paths), rtol=1e-12)


def test_nqm_standard_instance():
    q = NoisyQuadratic.standard(dim=16, condition=10.0, noise_scale=2.0)
    assert q.L == 1.0
    assert q.delta == pytest.approx(8.0)
    assert q.sigma_sq == pytest.approx(32.0)
    assert min(q.curvatures) == pytest.approx(0.1)


@pytest.mark.parametrize("c,z", [(1.0, 0.0), (1.0, 0.25), (1.5, 0.6)])
def test_steps_to_target_matches_the_stepped_recursion(c, z):
    q = NoisyQuadratic.standard(dim=6, condition=5.0)
    etas = np.array([0.05, 0.2, 0.6])
    target = 0.05 * q.delta
    got = q.steps_to_target(target, eta=etas, weight_sum_sq=c, zeta=z)
    gaps = q.expected_trajectory(eta=etas, mu=0.0, steps=400, weight_sum_sq=c, zeta=z)["loss_gap"]
    for i in range(len(etas)):
        hit = np.nonzero(gaps[i] <= target)[0]
        assert got[i] == (hit[0] if len(hit) else math.inf)


def test_steps_to_target_unreachable_is_inf():
    q = NoisyQuadratic.standard(dim=4)
    assert q.steps_to_target(1e-6, eta=0.5, weight_sum_sq=1.0, zeta=1.0) == math.inf  # noise floor above target
    assert q.steps_to_target(0.1, eta=2.5, weight_sum_sq=1.0, zeta=0.0) == math.inf  # unstable step


# ---------------------------------------------------------------- critical batch size


def test_fit_critical_batch_recovers_parameters():
    bs = np.array([1, 2, 8, 32, 128, 1024])
    s_min, b_noise = fit_critical_batch(bs, critical_batch_steps(bs, 40.0, 77.0))
    assert (s_min, b_noise) == (pytest.approx(40.0, rel=1e-10), pytest.approx(77.0, rel=1e-10))
    assert critical_batch_steps(77.0, 40.0, 77.0) == 80.0


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "dirichlet", "none"])
@pytest.mark.parametrize("B", [2, 16, 256])
def test_mixed_noise_scale_is_the_mixed_noise_trace(kind, B):
    g2, s2, r = 0.7, 9.0, 1.5 if kind != "dirichlet" else 0.5
    kappa = 0.0 if kind == "none" else kappa_from_ratio(r, B)
    direct = B * mixed_noise_trace(kind, B, kappa, g2, s2) / g2
    assert mixed_noise_scale(s2 / g2, kind, r) == pytest.approx(direct, rel=1e-12)


# ---------------------------------------------------------------- per-sample gradients and the noise scale


def _cnn():
    from gmix_curvature.models import build_model

    model = build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8), width=4).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fixed weights without touching the global RNG; BatchNorm gets non-trivial statistics
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.is_floating_point():
                t.copy_(0.5 * torch.rand(t.shape, generator=gen, dtype=t.dtype) + (0.5 if t.dim() == 1 else -0.25))
    return model


MODEL_CASES = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double(),
    "digits_cnn_eval": _cnn,
}


@pytest.mark.parametrize("make", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_per_sample_gradients_match_the_loop(make):
    model = make()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (7,), generator=gen)
    model.eval()
    ref = per_sample_gradients_loop(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    got = per_sample_gradients(model, x, y, chunk_size=3)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_restore_train_mode():
    model = _cnn().train()
    per_sample_gradients(model, torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1]))
    assert model.training


def test_gradient_noise_scale_against_dense_reference():
    model = _cnn()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (40,), generator=gen)
    A = per_sample_gradients_loop(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    m = A.mean(0)
    tr_sigma = float((A - m).square().sum(1).mean())
    res = gradient_noise_scale(model, (x, y), kind="rademacher", ratio=2.0, chunk_size=16)
    assert res.b_simple == pytest.approx(tr_sigma / float(m @ m), rel=1e-9)
    assert res.b_simple_mixed == pytest.approx(5 * res.b_simple + 4, rel=1e-12)
    assert res.fisher_trace == pytest.approx(float(A.square().sum(1).mean()), rel=1e-10)
    assert (res.num_samples, res.num_params, res.gamma_bar) == (40, A.shape[1], 5.0)
    assert res.to_dict()["kind"] == "rademacher"


def test_gradient_noise_scale_errors():
    model = _cnn()
    with pytest.raises(ValueError, match="at least 2 samples"):
        gradient_noise_scale(model, (torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor([0])))
    zero = nn.Sequential(nn.Flatten(), nn.Linear(64, 3, bias=False)).double()
    nn.init.zeros_(zero[1].weight)
    with pytest.raises(ValueError, match="full-batch gradient is exactly zero"):
        gradient_noise_scale(zero, (torch.zeros(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ValueError, match="unknown noise kind"):
        gradient_noise_scale(model, (torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])), kind="x")
