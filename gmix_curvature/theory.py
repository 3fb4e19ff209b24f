"""The quantities of Theorem 1 in closed form: γ̄ and ζ, the mixed gradient's second moment, the bound of
Appendix B, the noisy quadratic model it is checked on, and the gradient noise scale.

Conventions. π is a mixing-weight vector of Eq. 12 (mean 1/B, see :mod:`gmix_curvature.noise`); the B
per-sample gradients g_b are independent draws (with replacement) with mean ∇f and E‖g_b − ∇f‖² = σ²,
the weights independent of the data. Write s = Σ_b π_b and ζ = Σ_b π_b² (so γ = B·ζ). Then

    E‖Σ_b π_b g_b‖² = E[s²]·‖∇f‖² + E[ζ]·σ²                                         (corrected Eq. 18)

with E[ζ] = γ̄/B and E[s²] = 1 + Bκ² for Gaussian and Rademacher weights (Cov[π] = κ²I), E[s²] = 1 for
simplex weights (``dirichlet``) and plain averaging (``none``). Eq. 18 as printed, ζσ²/B + ‖∇f‖²
(sample-wise: ζσ² + ‖∇f‖²), is the case s ≡ 1: it drops Bκ²‖∇f‖². Carried through Appendix B the
correction replaces μ³ + 1 by μ³ + E[s²] in the step-size condition and the bound (see
:func:`theorem1_bound`, and ``theory/THEORY.md`` for the derivation).

Tr(G) and other traces are means over samples (the 1/n of Eq. 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gmix_curvature.noise import NoiseKind, expected_gamma, max_kappa

__all__ = [
    # weights
    "expected_zeta",
    "expected_weight_sum_sq",
    "gamma_variance",
    # second moment (Eq. 16-18)
    "second_moment",
    "eq18_second_moment",
    "mixed_noise_trace",
    "expected_mixed_gradient_norm",
    "mixed_gradient_norm_variance",
    # Theorem 1 / Appendix B
    "theorem1_step_limit",
    "theorem1_bound",
    "theorem1_rate",
    "theorem1_tuned_step",
    "theorem1_batch_condition",
    "NoisyQuadratic",
    # critical batch size
    "critical_batch_steps",
    "fit_critical_batch",
    "critical_batch_fit",
    "CriticalBatchFit",
    "mixed_noise_scale",
    "NoiseScaleResult",
    "per_sample_gradients",
    "gradient_noise_scale",
]


def _parse(kind: str | NoiseKind, batch_size: int, kappa: float) -> NoiseKind:
    kind = NoiseKind.parse(kind)
    expected_gamma(kind, batch_size, kappa)  # validates batch_size and kappa
    if kind is NoiseKind.DIRICHLET and kappa > 0 and kappa >= max_kappa(kind, batch_size):
        raise ValueError(
            f"dirichlet weights cannot reach kappa={kappa:g} at batch_size={batch_size}: "
            f"simplex weights need kappa < sqrt(B-1)/B = {max_kappa(kind, batch_size):.6g}"
        )
    return kind


def _nonneg(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- weights


def expected_zeta(kind: str | NoiseKind, batch_size: int, kappa: float) -> float:
    """E[ζ_t] = E[Σ_b π_b²] = γ̄/B (Appendix B's ζ; γ_t = B·ζ_t, Section 3).

    >>> expected_zeta("gaussian", 4, 0.25)
    0.5
    >>> expected_zeta("none", 4, 0.5)
    0.25
    """
    kind = _parse(kind, batch_size, kappa)
    return expected_gamma(kind, batch_size, kappa) / batch_size


def expected_weight_sum_sq(kind: str | NoiseKind, batch_size: int, kappa: float) -> float:
    """E[(Σ_b π_b)²], the factor of ‖∇f‖² in the mixed gradient's second moment (corrected Eq. 18).

    1 + Bκ² for Gaussian and Rademacher weights (Σπ_b has mean 1 and variance Bκ² under Cov[π] = κ²I,
    Eq. 12); exactly 1 for simplex weights and for plain averaging. Eq. 18 as printed assumes 1.

    >>> expected_weight_sum_sq("rademacher", 8, 0.25)
    1.5
    >>> expected_weight_sum_sq("dirichlet", 8, 0.25)
    1.0
    """
    kind = _parse(kind, batch_size, kappa)
    if kind in (NoiseKind.GAUSSIAN, NoiseKind.RADEMACHER):
        return 1.0 + batch_size * kappa**2
    return 1.0


def gamma_variance(kind: str | NoiseKind, batch_size: int, kappa: float) -> float:
    """Var[γ_t] of γ_t = B·Σ_b π_b² (Section 3), so that γ̄ over T steps has standard error √(Var/T).

    Gaussian: 4Bκ² + 2B³κ⁴ (π_b² = 1/B² + 2κξ_b/B + κ²ξ_b²); Rademacher: 4Bκ²; Dirichlet(α·1) from its
    moments E[π⁴] = α⁽⁴⁾/A⁽⁴⁾, E[π_i²π_j²] = (α⁽²⁾)²/A⁽⁴⁾ with A = Bα and x⁽ᵏ⁾ the rising factorial.

    >>> gamma_variance("rademacher", 4, 0.5)
    4.0
    >>> gamma_variance("gaussian", 2, 0.5)
    3.0
    """
    kind = _parse(kind, batch_size, kappa)
    B = batch_size
    if kind is NoiseKind.NONE or kappa == 0.0:
        return 0.0
    if kind is NoiseKind.GAUSSIAN:
        return 4 * B * kappa**2 + 2 * B**3 * kappa**4
    if kind is NoiseKind.RADEMACHER:
        return 4 * B * kappa**2
    a = ((B - 1) / (B**2 * kappa**2) - 1.0) / B  # the concentration used by sample_weights
    A = B * a
    den = A * (A + 1) * (A + 2) * (A + 3)
    m4 = a * (a + 1) * (a + 2) * (a + 3) / den
    m22 = (a * (a + 1)) ** 2 / den
    m2 = a * (a + 1) / (A * (A + 1))
    var_zeta = B * m4 + B * (B - 1) * m22 - (B * m2) ** 2
    return float(B**2 * max(var_zeta, 0.0))


# ------------------------------------------------------------------------------ second moment (Eq. 16-18)


def second_moment(
    kind: str | NoiseKind, batch_size: int, kappa: float, grad_norm_sq: float, sigma_sq: float
) -> float:
    """The exact E‖g‖² of the sample-wise mixed gradient g = Σ_b π_b g_b (Eq. 4, Eq. 16-18 corrected).

    For independent per-sample gradients with mean ∇f (‖∇f‖² = ``grad_norm_sq``) and
    E‖g_b − ∇f‖² = ``sigma_sq``, weights independent of the data:
    E‖g‖² = E[(Σπ_b)²]·‖∇f‖² + E[Σπ_b²]·σ², i.e. (1 + Bκ²)‖∇f‖² + (γ̄/B)σ² for Gaussian and Rademacher
    weights, ‖∇f‖² + (γ̄/B)σ² for Dirichlet, ‖∇f‖² + σ²/B for ``"none"``.

    >>> second_moment("gaussian", 4, 0.25, grad_norm_sq=1.0, sigma_sq=1.0)
    1.75
    >>> second_moment("none", 4, 0.25, grad_norm_sq=1.0, sigma_sq=1.0)
    1.25
    """
    g2, s2 = _nonneg("grad_norm_sq", grad_norm_sq), _nonneg("sigma_sq", sigma_sq)
    return expected_weight_sum_sq(kind, batch_size, kappa) * g2 + expected_zeta(kind, batch_size, kappa) * s2


def eq18_second_moment(
    kind: str | NoiseKind, batch_size: int, kappa: float, grad_norm_sq: float, sigma_sq: float
) -> float:
    """E‖g‖² as Eq. 18 prints it, averaged over the weights: ‖∇f‖² + E[ζ]·σ² = ‖∇f‖² + (γ̄/B)σ².

    Exact for simplex weights and plain averaging; for Gaussian and Rademacher weights it misses
    Bκ²‖∇f‖² (compare :func:`second_moment`).

    >>> eq18_second_moment("gaussian", 4, 0.25, grad_norm_sq=1.0, sigma_sq=1.0)
    1.5
    """
    g2, s2 = _nonneg("grad_norm_sq", grad_norm_sq), _nonneg("sigma_sq", sigma_sq)
    return g2 + expected_zeta(kind, batch_size, kappa) * s2


def mixed_noise_trace(
    kind: str | NoiseKind, batch_size: int, kappa: float, grad_norm_sq: float, sigma_sq: float
) -> float:
    """tr Cov[g] = E‖g − ∇f‖² of the mixed gradient: E[ζ]σ² + (E[(Σπ_b)²] − 1)‖∇f‖².

    The per-step noise of GradientMix; Appendix B.1's Eq. 27-30 give ζσ², which again assumes simplex
    weights (Σπ_b = 1).

    >>> mixed_noise_trace("rademacher", 4, 0.25, grad_norm_sq=1.0, sigma_sq=1.0)
    0.75
    """
    return second_moment(kind, batch_size, kappa, grad_norm_sq, sigma_sq) - _nonneg("grad_norm_sq", grad_norm_sq)


def expected_mixed_gradient_norm(
    kind: str | NoiseKind, num_samples: int, kappa: float, mean_norm_sq: float, trace_ata: float
) -> float:
    """E‖A z̃‖² for the full-data mixed gradient A z̃ of Eq. 7, z̃ ~ Eq. 12 with B = n (Eq. 9-10).

    ``mean_norm_sq`` = ‖Az‖² (z = 1/n), ``trace_ata`` = Tr(AᵀA) = Σ_i ‖∇ℓ_i‖². With Cov[z̃] = κ²I
    (Gaussian, Rademacher) this is ‖Az‖² + κ²·Tr(AᵀA): Hutchinson's estimator plus the term of the
    non-zero mean of z̃. Simplex weights have Cov = κ²n/(n−1)(I − 11ᵀ/n), which gives
    ‖Az‖² + κ²n/(n−1)·(Tr(AᵀA) − n‖Az‖²).

    >>> expected_mixed_gradient_norm("gaussian", 10, 0.1, mean_norm_sq=1.0, trace_ata=20.0)
    1.2
    """
    kind = _parse(kind, num_samples, kappa)
    m2, tr = _nonneg("mean_norm_sq", mean_norm_sq), _nonneg("trace_ata", trace_ata)
    if kind is NoiseKind.NONE or kappa == 0.0:
        return m2
    if kind is NoiseKind.DIRICHLET:
        return m2 + kappa**2 * num_samples / (num_samples - 1) * (tr - num_samples * m2)
    return m2 + kappa**2 * tr


def mixed_gradient_norm_variance(kind: str | NoiseKind, gram: torch.Tensor | np.ndarray, kappa: float) -> float:
    """Var‖A z̃‖² of the full-data mixed gradient of Eq. 7, z̃ = z + κε with z = 1/n (Eq. 9-10, Eq. 12).

    ``gram`` is K = AAᵀ (n × n, K_ij = ⟨∇ℓ_i, ∇ℓ_j⟩), so ‖Az̃‖² = z̃ᵀKz̃. With m = Kz (the per-sample
    inner products with the full gradient, ⟨∇ℓ_i, ∇f⟩): for Gaussian ε, 4κ²‖m‖² + 2κ⁴‖K‖²_F; for Rademacher
    ε, 4κ²‖m‖² + 2κ⁴(‖K‖²_F − Σ_i K_ii²) (ε_i² = 1 takes the diagonal's variance away); 0 for ``none``.
    The standard error of a mean over D draws is √(Var/D), which says beforehand whether a term of
    :func:`expected_mixed_gradient_norm` can be resolved by D draws. Dirichlet weights are not covered.

    >>> round(mixed_gradient_norm_variance("gaussian", torch.eye(2), 0.5), 12)  # 4·¼·½ + 2·(1/16)·2
    0.75
    >>> round(mixed_gradient_norm_variance("rademacher", torch.eye(2), 0.5), 12)
    0.5
    """
    k = torch.as_tensor(gram, dtype=torch.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 1:
        raise ValueError(f"gram must be a square n x n matrix, got shape {tuple(k.shape)}")
    n = k.shape[0]
    kind = _parse(kind, n, kappa)
    if kind is NoiseKind.DIRICHLET:
        raise ValueError("mixed_gradient_norm_variance covers gaussian, rademacher and none weights, not dirichlet")
    if kind is NoiseKind.NONE or kappa == 0.0:
        return 0.0
    m = k.sum(1) / n
    quad = float(k.square().sum())
    if kind is NoiseKind.RADEMACHER:
        quad -= float(k.diagonal().square().sum())
    return 4 * kappa**2 * float(m @ m) + 2 * kappa**4 * quad


# ---------------------------------------------------------------------------------- Theorem 1, App. B


def _c(kind: str | NoiseKind, batch_size: int, kappa: float, printed: bool) -> float:
    return 1.0 if printed else expected_weight_sum_sq(kind, batch_size, kappa)


def _check_mu(mu: float) -> float:
    mu = float(mu)
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"momentum mu must lie in [0, 1), got {mu!r}")
    return mu


def theorem1_step_limit(
    L: float, mu: float, kind: str | NoiseKind = "none", batch_size: int = 1, kappa: float = 0.0, *,
    printed: bool = False,
) -> float:
    """The largest step size of Theorem 1, *exclusive*: η < 2(1−μ)²/(L(μ³ + c)), c = E[(Σπ_b)²].

    The bound's denominator 1 − Lη(μ³ + c)/(2(1−μ)²) vanishes at equality, so the condition must be
    strict (Theorem 1 prints η ≤ …). ``printed=True`` gives the paper's c = 1.

    >>> theorem1_step_limit(1.0, 0.0, "rademacher", 1, 2.0)
    0.4
    >>> theorem1_step_limit(1.0, 0.0, "rademacher", 1, 2.0, printed=True)
    2.0
    """
    mu = _check_mu(mu)
    if not L > 0:
        raise ValueError(f"L must be > 0, got {L!r}")
    return 2 * (1 - mu) ** 2 / (L * (mu**3 + _c(kind, batch_size, kappa, printed)))


def theorem1_bound(
    *,
    L: float,
    delta: float,
    sigma_sq: float,
    steps: int,
    eta: float,
    mu: float,
    kind: str | NoiseKind = "none",
    batch_size: int = 1,
    kappa: float = 0.0,
    printed: bool = False,
) -> float:
    """The explicit bound of Appendix B (before Lemma 3) on (1/T)·Σ_{t<T} E‖∇f(θ_{t+1/2})‖², Eq. 13 with v_0 = 0.

        (1/T)Σ E‖∇f(θ_{t+½})‖² ≤ [Δ(1−μ)/(ηT) + ηLγ̄σ²/(2(1−μ)²B)] / [1 − Lη(μ³ + c)/(2(1−μ)²)]

    with γ̄ = E[γ_t], c = E[(Σπ_b)²] (corrected Eq. 18), Δ = f(θ_0) − f*. ``printed=True`` uses c = 1 as the
    paper does. Returns ``inf`` where η is at or above :func:`theorem1_step_limit` (no bound).

    >>> round(theorem1_bound(L=1.0, delta=1.0, sigma_sq=1.0, steps=100, eta=0.5, mu=0.0), 12)
    0.36
    """
    mu = _check_mu(mu)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    eta = float(eta)
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta!r}")
    gbar = expected_gamma(kind, batch_size, kappa)
    den = 1.0 - L * eta * (mu**3 + _c(kind, batch_size, kappa, printed)) / (2 * (1 - mu) ** 2)
    if den <= 0:
        return math.inf
    num = delta * (1 - mu) / (eta * steps) + eta * L * gbar * sigma_sq / (2 * (1 - mu) ** 2 * batch_size)
    return num / den


def theorem1_rate(
    *, L: float, delta: float, sigma_sq: float, steps: int, mu: float, gamma_bar: float, batch_size: int,
    c: float = 1.0,
) -> tuple[float, float]:
    """The two terms of Eq. 14 (the O(·) without its constant): LΔ(μ³ + c)/(T(1−μ)) and √(2LΔσ²γ̄/(BT(1−μ))).

    c = 1 in the paper; the corrected Eq. 18 gives c = E[(Σπ_b)²] in the first term.

    >>> theorem1_rate(L=1.0, delta=2.0, sigma_sq=1.0, steps=100, mu=0.0, gamma_bar=1.0, batch_size=1)
    (0.02, 0.2)
    """
    mu = _check_mu(mu)
    first = L * delta * (mu**3 + c) / (steps * (1 - mu))
    second = math.sqrt(2 * L * delta * sigma_sq * gamma_bar / (batch_size * steps * (1 - mu)))
    return first, second


def theorem1_tuned_step(
    *, L: float, delta: float, sigma_sq: float, steps: int, mu: float, gamma_bar: float, batch_size: int
) -> float:
    """η* = √(2Δ(1−μ)³B/(TLσ²γ̄)), the minimiser of Ψ'_T(η) = Δ(1−μ)/(ηT) + ηLγ̄σ²/(2(1−μ)²B) (Appendix B).

    Ψ'_T(η*) = √(2LΔσ²γ̄/(BT(1−μ))), the second term of Eq. 14/22.

    >>> theorem1_tuned_step(L=1.0, delta=2.0, sigma_sq=1.0, steps=100, mu=0.0, gamma_bar=1.0, batch_size=1)
    0.2
    """
    mu = _check_mu(mu)
    return math.sqrt(2 * delta * (1 - mu) ** 3 * batch_size / (steps * L * sigma_sq * gamma_bar))


def theorem1_batch_condition(
    *, L: float, delta: float, sigma_sq: float, steps: int, mu: float, gamma_bar: float, c: float = 1.0
) -> float:
    """The batch size below which Eq. 14's second term dominates: B ≤ 2σ²γ̄T(1−μ)/(LΔ(μ³ + c)²).

    The Remark after Theorem 1 states it as B = O((1−μ)/(μ³+1)² · σ²Tγ̄/(LΔ)); it grows linearly in γ̄.

    >>> theorem1_batch_condition(L=1.0, delta=1.0, sigma_sq=1.0, steps=100, mu=0.0, gamma_bar=2.0)
    400.0
    """
    mu = _check_mu(mu)
    return 2 * sigma_sq * gamma_bar * steps * (1 - mu) / (L * delta * (mu**3 + c) ** 2)


@dataclass(frozen=True)
class NoisyQuadratic:
    """The noisy quadratic model: f(θ) = ½Σ_i h_i(θ_i − θ*_i)², per-sample gradient ∇f(θ) + ξ, ξ ~ N(0, diag(noise)).

    It satisfies (C-1) with L = max h_i and (C-2) with σ² = Σ_i noise_i, both exactly and everywhere; it is
    least squares with a Gaussian design linearised at its optimum (there Σ = s²H for label noise s²),
    the model of Zhang et al. (2019) for batch-size studies. ``initial_error`` is θ_0 − θ*;
    Δ = f(θ_0) − f* = ½Σ h_i e_i². Because the weights of GradientMix are independent of the state,
    the second moments of Eq. 13 on this model evolve by a linear recursion, so every expectation
    below is exact (no sampling).

    >>> q = NoisyQuadratic.standard(dim=4, condition=4.0)
    >>> q.L, q.delta, q.sigma_sq
    (1.0, 2.0, 4.0)
    """

    curvatures: tuple[float, ...]
    noise: tuple[float, ...]
    initial_error: tuple[float, ...]

    def __post_init__(self) -> None:
        d = len(self.curvatures)
        if d < 1 or len(self.noise) != d or len(self.initial_error) != d:
            raise ValueError("curvatures, noise and initial_error must be non-empty and of one length")
        if min(self.curvatures) <= 0 or min(self.noise) < 0:
            raise ValueError("curvatures must be > 0 and noise >= 0")

    @classmethod
    def standard(cls, dim: int = 16, condition: float = 10.0, noise_scale: float = 1.0) -> NoisyQuadratic:
        """h_i geometric from 1 down to 1/condition, Σ ∝ H scaled so that σ² = tr Σ = dim·noise_scale,
        and e_i = 1/√h_i (every mode starts with loss ½, so Δ = dim/2)."""
        if dim < 1 or condition < 1:
            raise ValueError(f"need dim >= 1 and condition >= 1, got dim={dim}, condition={condition}")
        h = np.geomspace(1.0, 1.0 / condition, dim) if dim > 1 else np.ones(1)
        noise = noise_scale * h * dim / h.sum()
        return cls(tuple(map(float, h)), tuple(map(float, noise)), tuple(map(float, 1.0 / np.sqrt(h))))

    @property
    def L(self) -> float:  # noqa: N802 - the paper's name
        return float(max(self.curvatures))

    @property
    def sigma_sq(self) -> float:
        return float(sum(self.noise))

    @property
    def delta(self) -> float:
        return float(0.5 * sum(h * e * e for h, e in zip(self.curvatures, self.initial_error)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h, diag Σ, e_0) as float64 arrays."""
        return tuple(np.asarray(v, dtype=float) for v in (self.curvatures, self.noise, self.initial_error))

    def expected_trajectory(
        self,
        *,
        eta: float | np.ndarray,
        mu: float | np.ndarray,
        steps: int,
        kind: str | NoiseKind = "none",
        batch_size: int = 1,
        kappa: float = 0.0,
        weight_sum_sq: float | np.ndarray | None = None,
        zeta: float | np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Exact E‖∇f(θ_{t+½})‖² (t < T) and E f(θ_t) − f* (t ≤ T) of SGD + Nesterov + GradientMix (Eq. 13).

        The state z = (e, v) of each coordinate (e = θ − θ*) obeys z' = A(s)z − η·n·(1, 1)ᵀ with
        A(s) = [[1−ηsh, μ(1−ηsh)], [−ηsh, μ(1−ηsh)]], s = Σπ_b and n = Σπ_b ξ_b (E[n²|π] = ζΣ_ii), so
        M = E[zzᵀ] obeys M' = E_s[A M Aᵀ] + η²E[ζ]Σ_ii·11ᵀ, which needs only E[s] = 1 and E[s²].
        ``weight_sum_sq``/``zeta`` override E[s²]/E[ζ]; ``eta``, ``mu`` and they broadcast to a batch of
        configurations (leading axis), and the results then have that leading axis.
        """
        h, noise, e0 = self.arrays()
        c = expected_weight_sum_sq(kind, batch_size, kappa) if weight_sum_sq is None else weight_sum_sq
        z = expected_zeta(kind, batch_size, kappa) if zeta is None else zeta
        eta_, mu_, c_, z_ = (np.asarray(a, dtype=float)[..., None] for a in np.broadcast_arrays(eta, mu, c, z))
        shape = np.broadcast_shapes(eta_.shape, h.shape)
        m_ee = np.broadcast_to(e0**2, shape).copy()
        m_ev = np.zeros(shape)
        m_vv = np.zeros(shape)
        a = eta_ * h  # ηh
        q = z_ * eta_**2 * noise
        grad_sq = np.empty(shape[:-1] + (steps,))
        loss = np.empty(shape[:-1] + (steps + 1,))
        for t in range(steps):
            loss[..., t] = 0.5 * (h * m_ee).sum(-1)
            m_xx = m_ee + 2 * mu_ * m_ev + mu_**2 * m_vv  # x = e + μv = θ_{t+½} − θ*
            grad_sq[..., t] = (h**2 * m_xx).sum(-1)
            r1 = 1 - 2 * a + c_ * a**2  # E[(1−ηsh)²], with E[s] = 1
            # e' = (1−ηsh)x − ηn ;  v' = −ηsh·e + μ(1−ηsh)v − ηn = (1−ηsh)x − e − ηn  (x = e + μv)
            m_ex = m_ee + mu_ * m_ev
            new_ee = r1 * m_xx + q
            new_ev = r1 * m_xx - (1 - a) * m_ex + q
            new_vv = r1 * m_xx - 2 * (1 - a) * m_ex + m_ee + q
            m_ee, m_ev, m_vv = new_ee, new_ev, new_vv
        loss[..., steps] = 0.5 * (h * m_ee).sum(-1)
        return {"grad_norm_sq": grad_sq, "loss_gap": loss}

    def steps_to_target(
        self,
        target: float,
        *,
        eta: float | np.ndarray,
        weight_sum_sq: float | np.ndarray,
        zeta: float | np.ndarray,
        max_steps: int = 10**7,
    ) -> np.ndarray:
        """Plain SGD with GradientMix (μ = 0): the first t with E f(θ_t) − f* ≤ ``target``, in closed form.

        Per coordinate E[e_t²] = a^t(e_0² − m_∞) + m_∞ with a = 1 − 2ηh + η²h²E[s²] and
        m_∞ = η²E[ζ]Σ_ii/(1 − a); the first crossing is found by bisection on t, exact when every
        coordinate decreases (e_0² ≥ m_∞), which holds whenever the target is reachable from above on this
        model's standard instances; otherwise the crossing found is one crossing. ``inf`` where the
        target is never reached (a ≥ 1 or the noise floor above it) or only after ``max_steps``.
        """
        h, noise, e0 = self.arrays()
        eta_, c_, z_ = (np.asarray(v, dtype=float)[..., None] for v in np.broadcast_arrays(eta, weight_sum_sq, zeta))
        a = 1 - 2 * eta_ * h + (eta_ * h) ** 2 * c_
        stable = (a < 1).all(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            m_inf = np.where(a < 1, (eta_**2) * z_ * noise / (1 - a), np.inf)
        w = 0.5 * h * (e0**2 - m_inf)
        floor = 0.5 * (h * m_inf).sum(-1)

        def gap(t: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore"):
                return (w * np.power(np.where(stable[..., None], a, 0.0), t[..., None])).sum(-1) + floor

        reachable = stable & (floor < target)
        lo = np.zeros(stable.shape)
        hi = np.full(stable.shape, float(max_steps))
        reachable &= gap(hi) <= target
        done = gap(lo) <= target
        for _ in range(int(math.ceil(math.log2(max_steps))) + 2):
            mid = np.floor((lo + hi) / 2)
            ok = gap(mid) <= target
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        out = np.where(done, 0.0, hi)
        return np.where(reachable | done, out, np.inf)


# ------------------------------------------------------------------------------- critical batch size


def critical_batch_steps(batch_size: float | np.ndarray, s_min: float, b_noise: float) -> float | np.ndarray:
    """S(B) = S_min·(1 + B_noise/B), steps to a target against batch size (McCandlish et al. 2018, Eq. 2.11).

    >>> critical_batch_steps(10.0, s_min=100.0, b_noise=10.0)
    200.0
    """
    out = s_min * (1 + b_noise / np.asarray(batch_size, dtype=float))
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class CriticalBatchFit:
    """S(B) = S_min(1 + B_noise/B) fitted to (B, S) pairs (:func:`critical_batch_fit`), with standard errors.

    ``s_min_se``/``b_noise_se`` come from the covariance of the weighted least-squares fit, σ̂²(XᵀX)⁻¹ with
    σ̂² = RSS/(n − 2) the variance of the relative residuals (the delta method for B_noise = slope/S_min);
    on exact steps they measure how far the data are from the form, not sampling noise. NaN with two points.
    ``rms_rel_residual`` is √(RSS/n), the typical relative misfit.
    """

    s_min: float
    b_noise: float
    s_min_se: float
    b_noise_se: float
    rms_rel_residual: float
    num_points: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def critical_batch_fit(batch_sizes: Sequence[float], steps: Sequence[float]) -> CriticalBatchFit:
    """Fit S(B) = S_min(1 + B_noise/B) (McCandlish et al. 2018, Eq. 2.11) by weighted least squares of S on
    1/B with weights 1/S², and give the fit's standard errors (:class:`CriticalBatchFit`).

    S is linear in 1/B (intercept S_min, slope S_min·B_noise); the weights fit relative errors.

    >>> bs = [1, 4, 16, 64]
    >>> fit = critical_batch_fit(bs, [critical_batch_steps(b, 50.0, 8.0) for b in bs])
    >>> round(fit.s_min, 6), round(fit.b_noise, 6), fit.b_noise_se < 1e-9
    (50.0, 8.0, True)
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1 or b.size < 2 or not (
        np.isfinite(s).all() and (s > 0).all() and np.isfinite(b).all() and (b > 0).all()
    ):
        raise ValueError("fit_critical_batch needs >= 2 finite positive (batch size, steps) pairs of one length")
    X = np.stack([np.ones_like(b), 1 / b], 1) / s[:, None]
    y = np.ones_like(s)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    s_min, slope = float(coef[0]), float(coef[1])
    resid = y - X @ coef
    rss = float(resid @ resid)
    se_s = se_b = math.nan
    if b.size > 2:
        cov = rss / (b.size - 2) * np.linalg.pinv(X.T @ X)
        grad = np.array([-slope / s_min**2, 1 / s_min])  # d(slope/S_min)/d(S_min, slope)
        se_s, se_b = math.sqrt(max(cov[0, 0], 0.0)), math.sqrt(max(float(grad @ cov @ grad), 0.0))
    return CriticalBatchFit(s_min, slope / s_min, se_s, se_b, math.sqrt(rss / b.size), int(b.size))


def fit_critical_batch(batch_sizes: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """(S_min, B_noise) of :func:`critical_batch_fit`: S(B) = S_min(1 + B_noise/B) by weighted least squares of S
    on 1/B with weights 1/S².

    >>> bs = [1, 4, 16, 64]
    >>> s_min, b_noise = fit_critical_batch(bs, [critical_batch_steps(b, 50.0, 8.0) for b in bs])
    >>> round(s_min, 6), round(b_noise, 6)
    (50.0, 8.0)
    """
    fit = critical_batch_fit(batch_sizes, steps)
    return fit.s_min, fit.b_noise


def mixed_noise_scale(b_simple: float, kind: str | NoiseKind, ratio: float) -> float:
    """B_simple of the mixed gradient: tr Cov[g]·B/‖∇f‖² = γ̄·B_simple + (E[(Σπ_b)²] − 1)·B.

    From :func:`mixed_noise_trace` with κ = r/B: γ̄ = 1 + r², and (E[s²] − 1)·B = r² for Gaussian and
    Rademacher weights, 0 for simplex weights, so the result does not depend on B. B_simple =
    tr Σ/‖∇f‖² is the unmixed noise scale (McCandlish et al. 2018, Eq. 2.8).

    >>> mixed_noise_scale(10.0, "gaussian", 2.0)
    54.0
    >>> mixed_noise_scale(10.0, "dirichlet", 2.0)
    50.0
    """
    kind = NoiseKind.parse(kind)
    r2 = _nonneg("ratio", ratio) ** 2
    if kind is NoiseKind.NONE:
        return float(b_simple)
    return (1 + r2) * float(b_simple) + (r2 if kind in (NoiseKind.GAUSSIAN, NoiseKind.RADEMACHER) else 0.0)


@dataclass(frozen=True)
class NoiseScaleResult:
    """The simple gradient noise scale at one θ over a data set (McCandlish et al. 2018).

    ``trace_sigma`` = tr Σ = (1/n)Σ‖∇ℓ_i − ∇f‖² (the σ² of (C-2) for one sample), ``grad_norm_sq`` = ‖∇f‖²,
    ``b_simple`` = tr Σ/‖∇f‖², ``b_simple_mixed`` the same for GradientMix of ``kind`` at relative scale
    ``ratio`` = κB (:func:`mixed_noise_scale`), ``gamma_bar`` = 1 + ratio² (1 for ``none``),
    ``fisher_trace`` = Tr(AᵀA)/n, the empirical-Fisher trace (mean convention).
    """

    trace_sigma: float
    grad_norm_sq: float
    b_simple: float
    b_simple_mixed: float
    kind: str
    ratio: float
    gamma_bar: float
    fisher_trace: float
    num_samples: int
    num_params: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def per_sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Per-sample gradients ∇_θ ℓ_i, an (n, d) tensor, by ``torch.func`` (vmap of grad), in eval mode.

    The columns of A in Eq. 6 (here as rows). The model's mode is restored afterwards. ``loss_fn``
    maps (logits, labels) to per-sample losses (default: cross-entropy, ``reduction='none'``); the
    reference is :func:`gmix_curvature.mixing.per_sample_gradients_loop`.

    >>> model = nn.Linear(3, 2)
    >>> per_sample_gradients(model, torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])).shape
    torch.Size([5, 8])
    """
    from torch.func import functional_call, grad, vmap

    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(reduction="none")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    was_training = model.training
    model.eval()

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    fn = vmap(grad(one), in_dims=(None, 0, 0))
    rows = []
    try:
        for start in range(0, x.shape[0], chunk_size):
            g = fn(params, x[start : start + chunk_size], y[start : start + chunk_size])
            rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1))
    finally:
        model.train(was_training)
    return torch.cat(rows)


def gradient_noise_scale(
    model: nn.Module,
    data: Any,
    *,
    kind: str | NoiseKind = "none",
    ratio: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int = 512,
) -> NoiseScaleResult:
    """B_simple = tr Σ/‖∇f‖² over a whole data set at the model's θ, with and without GradientMix.

    ``data`` is an :class:`~gmix_curvature.data.ArrayDataset` or an (x, y) pair. Per-sample gradients in
    eval mode (:func:`per_sample_gradients`), accumulated in float64; tr Σ is the mean over samples of
    ‖∇ℓ_i − ∇f‖². With mixing of ``kind`` at relative scale ``ratio`` = κB the per-step noise trace is
    (γ̄/B)tr Σ + (E[(Σπ)²] − 1)‖∇f‖² (:func:`mixed_noise_trace`), hence ``b_simple_mixed``.

    >>> gen = torch.Generator().manual_seed(0)
    >>> data = (torch.randn(64, 3, generator=gen), torch.randint(0, 2, (64,), generator=gen))
    >>> r = gradient_noise_scale(nn.Linear(3, 2), data, kind="gaussian", ratio=1.0)
    >>> r.gamma_bar, r.b_simple_mixed == 2 * r.b_simple + 1
    (2.0, True)
    """
    kind = NoiseKind.parse(kind)
    ratio = _nonneg("ratio", ratio)
    x, y = data.tensors() if hasattr(data, "tensors") else data
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    n = int(x.shape[0])
    if n < 2:
        raise ValueError(f"the gradient noise scale needs at least 2 samples, got {n}")
    total = None
    sq = 0.0
    for start in range(0, n, chunk_size):
        a = per_sample_gradients(model, x[start : start + chunk_size], y[start : start + chunk_size], loss_fn)
        a = a.to(torch.float64)
        total = a.sum(0) if total is None else total + a.sum(0)
        sq += float((a * a).sum())
    mean = total / n
    g2 = float(mean @ mean)
    fisher = sq / n
    tr_sigma = max(fisher - g2, 0.0)
    if g2 == 0.0:
        raise ValueError("the full-batch gradient is exactly zero: the noise scale tr(Sigma)/|G|^2 is undefined")
    b_simple = tr_sigma / g2
    gbar = 1.0 if kind is NoiseKind.NONE else 1.0 + ratio**2
    return NoiseScaleResult(
        trace_sigma=tr_sigma,
        grad_norm_sq=g2,
        b_simple=b_simple,
        b_simple_mixed=mixed_noise_scale(b_simple, kind, ratio),
        kind=kind.value,
        ratio=ratio,
        gamma_bar=gbar,
        fisher_trace=fisher,
        num_samples=n,
        num_params=int(mean.numel()),
    )
