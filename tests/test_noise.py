"""Mixing weights (Eq. 12) against their defining moments and closed forms."""

import math

import pytest
import torch

from gmix_curvature.noise import expected_gamma, gamma, kappa_from_ratio, max_kappa, sample_weights, zeta

N_DRAWS = 20_000
Z = 5.0  # tolerance in standard errors for Monte Carlo moments

CASES = [  # (kind, batch_size, kappa)
    ("gaussian", 8, 0.2),
    ("rademacher", 8, 0.2),
    ("dirichlet", 8, 0.1),
    ("gaussian", 64, 2.0 / 64),
    ("rademacher", 64, 2.0 / 64),
    ("dirichlet", 64, 1.0 / 64),
]


def _draws(kind, B, kappa, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([sample_weights(kind, B, kappa, g, dtype=torch.float64) for _ in range(N_DRAWS)])


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind,B,kappa", CASES, ids=[f"{k}-B{b}" for k, b, _ in CASES])
def test_mean_and_variance(kind, B, kappa):
    pi = _draws(kind, B, kappa)
    mean = pi.mean(0)
    se_mean = kappa / math.sqrt(N_DRAWS)
    assert ((mean - 1 / B).abs() < Z * se_mean).all()
    # second moment about the known mean 1/B (exactly κ² per draw for Rademacher weights)
    dev2 = (pi - 1 / B) ** 2
    m2 = dev2.mean(0)
    se_m2 = dev2.std(0) / math.sqrt(N_DRAWS)
    assert ((m2 - kappa**2).abs() <= Z * se_m2 + 1e-12 * kappa**2).all()


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_covariance_is_kappa_squared_identity(kind):
    B, kappa = 6, 0.1
    pi = _draws(kind, B, kappa, seed=1)
    cov = torch.cov(pi.T)
    off = cov - torch.diag(torch.diag(cov))
    # each off-diagonal entry is a mean of products of independent centred variables: sd κ²/√N
    assert off.abs().max() < Z * kappa**2 / math.sqrt(N_DRAWS)


def test_dirichlet_covariance_closed_form():
    B, kappa = 5, 0.15
    pi = _draws("dirichlet", B, kappa, seed=2)
    expected = kappa**2 * B / (B - 1) * (torch.eye(B) - torch.ones(B, B) / B)
    assert torch.allclose(torch.cov(pi.T), expected.to(torch.float64), atol=Z * kappa**2 * 2 / math.sqrt(N_DRAWS))


def test_rademacher_values_are_exactly_mean_plus_minus_kappa():
    B, kappa = 16, 0.03
    pi = sample_weights("rademacher", B, kappa, torch.Generator().manual_seed(3), dtype=torch.float64)
    dev = (pi - 1 / B).abs()
    assert torch.equal(dev.round(decimals=12), torch.full((B,), kappa, dtype=torch.float64).round(decimals=12))


def test_dirichlet_sums_to_one_and_is_nonnegative():
    for seed in range(20):
        pi = sample_weights("dirichlet", 32, 0.02, torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert abs(float(pi.sum()) - 1.0) < 1e-12
        assert (pi >= 0).all()


def test_none_is_plain_average():
    assert torch.equal(sample_weights("none", 4, 1.0), torch.full((4,), 0.25))
    assert gamma(sample_weights("none", 7, 0.0)) == pytest.approx(1.0)


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "dirichlet"])
def test_expected_gamma_matches_simulation(kind):
    B, r = 32, 1.5
    kappa = kappa_from_ratio(r, B)
    pi = _draws(kind, B, kappa, seed=4)
    gammas = B * (pi**2).sum(1)
    assert expected_gamma(kind, B, kappa) == pytest.approx(1 + r**2)
    se = gammas.std() / math.sqrt(N_DRAWS)
    assert abs(float(gammas.mean()) - (1 + B**2 * kappa**2)) < Z * float(se)


def test_gamma_and_zeta_closed_forms():
    w = torch.tensor([0.5, 0.25, 0.25])
    assert zeta(w) == pytest.approx(0.375)
    assert gamma(w) == pytest.approx(3 * 0.375)


def test_generator_makes_draws_reproducible_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a = sample_weights("gaussian", 10, 0.1, torch.Generator().manual_seed(5))
    b = sample_weights("gaussian", 10, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "args,match",
    [
        (("laplace", 4, 0.1), "unknown noise kind 'laplace'; valid kinds: none, gaussian"),
        (("gaussian", 4, -0.1), "kappa must be a finite number >= 0"),
        (("gaussian", 0, 0.1), "batch_size must be an integer >= 1"),
        (("gaussian", 4, float("nan")), "kappa must be a finite number"),
        (("dirichlet", 4, 0.5), r"dirichlet weights cannot reach kappa=0.5 at batch_size=4: .* = 0.433013"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        sample_weights(*args)


def test_max_kappa():
    assert max_kappa("dirichlet", 9) == pytest.approx(math.sqrt(8) / 9)
    assert max_kappa("rademacher", 9) == math.inf
