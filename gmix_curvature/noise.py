"""Mixing weights π of GradientMix (Eq. 12 of the paper) and the noise quantity γ_t of Theorem 1.

Every weight vector π ∈ R^B has mean E[π] = 1/B · 1 (the unbiasedness condition of Eq. 3/4). The kinds:

========== ============================================ ====================================
kind       π_b                                           Cov[π]
========== ============================================ ====================================
none       1/B exactly (plain averaging, the baseline)  0
gaussian   1/B + κ·ξ_b,  ξ_b ~ N(0, 1)                   κ² I            (Eq. 12)
rademacher 1/B + κ·ε_b,  ε_b = ±1 with probability 1/2   κ² I            (Eq. 12)
dirichlet  symmetric Dirichlet on the unit simplex       κ²·B/(B−1)·(I − 11ᵀ/B)
========== ============================================ ====================================

The Dirichlet kind is the unit-simplex case of the appendix (Σ_b π_b = 1 exactly, so Eq. 18 holds as
printed); its concentration α is set so that every weight has variance κ², which requires
κ < √(B−1)/B. Its covariance is not κ²I: the simplex forces the weights to be negatively correlated.

γ_t = B·Σ_b π_b² (Section 3). For all three random kinds E[γ_t] = γ̄ = 1 + B²κ²; with the relative
scale r = κ·B that is γ̄ = 1 + r², independent of B. Use :func:`kappa_from_ratio` to go from r to κ.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
import torch

__all__ = [
    "NoiseKind",
    "sample_weights",
    "gamma",
    "zeta",
    "expected_gamma",
    "kappa_from_ratio",
    "max_kappa",
]


class NoiseKind(str, Enum):
    """The mixing-weight distributions of Eq. 12 (plus the baseline and the unit-simplex case)."""

    NONE = "none"
    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    DIRICHLET = "dirichlet"

    @classmethod
    def parse(cls, kind: str | NoiseKind) -> NoiseKind:
        """Turn a name into a :class:`NoiseKind`; an unknown name raises ``ValueError`` listing the valid ones.

        >>> NoiseKind.parse("gaussian")
        <NoiseKind.GAUSSIAN: 'gaussian'>
        """
        try:
            return cls(kind)
        except ValueError:
            valid = ", ".join(k.value for k in cls)
            raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {valid}") from None


def _check(batch_size: int, kappa: float) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not math.isfinite(kappa) or kappa < 0:
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")


def max_kappa(kind: str | NoiseKind, batch_size: int) -> float:
    """The largest κ a kind can reach at this batch size (exclusive for ``dirichlet``).

    Gaussian and Rademacher weights take any κ; simplex weights have per-weight variance at most
    (1/B)(1 − 1/B), reached only in the limit α → 0, so κ < √(B−1)/B.

    >>> max_kappa("dirichlet", 4)
    0.4330127018922193
    >>> max_kappa("gaussian", 4)
    inf
    """
    kind = NoiseKind.parse(kind)
    if kind is NoiseKind.DIRICHLET:
        return math.sqrt(batch_size - 1) / batch_size
    return math.inf


def kappa_from_ratio(ratio: float, batch_size: int) -> float:
    """κ from the relative scale r = κ·B, the standard deviation of π_b in units of its mean 1/B.

    γ̄ = 1 + r² for Gaussian, Rademacher and Dirichlet weights, whatever the batch size.

    >>> kappa_from_ratio(2.0, 512)
    0.00390625
    """
    _check(batch_size, ratio)
    return float(ratio) / batch_size


def sample_weights(
    kind: str | NoiseKind,
    batch_size: int,
    kappa: float,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw one mixing-weight vector π of shape (batch_size,) with E[π] = 1/B (Eq. 12).

    Args:
        kind: ``"none"``, ``"gaussian"``, ``"rademacher"`` or ``"dirichlet"`` (see the module table).
        batch_size: B, the number of gradients mixed (samples for Eq. 4, devices/groups for Eq. 3).
        kappa: κ, the standard deviation of each weight (ignored for ``"none"``).
        generator: the source of randomness; ``None`` uses torch's default generator. The global RNG
            is never reseeded.
        dtype: floating dtype of the result.

    >>> g = torch.Generator().manual_seed(0)
    >>> sample_weights("rademacher", 4, 0.1, g)
    tensor([0.1500, 0.3500, 0.3500, 0.1500])
    >>> sample_weights("none", 4, 0.0)
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    kind = NoiseKind.parse(kind)
    _check(batch_size, kappa)
    mean = 1.0 / batch_size
    if kind is NoiseKind.NONE or kappa == 0.0:
        return torch.full((batch_size,), mean, dtype=dtype)
    if kind is NoiseKind.GAUSSIAN:
        xi = torch.randn(batch_size, generator=generator, dtype=torch.float64)
        return (mean + kappa * xi).to(dtype)
    if kind is NoiseKind.RADEMACHER:
        eps = torch.randint(0, 2, (batch_size,), generator=generator, dtype=torch.int64) * 2 - 1
        return (mean + kappa * eps.to(torch.float64)).to(dtype)
    # Dirichlet(α·1): Var[π_b] = (1/B)(1 − 1/B)/(Bα + 1) = κ²  ⇒  Bα + 1 = (B − 1)/(B²κ²).
    bound = max_kappa(kind, batch_size)
    if batch_size == 1 or kappa >= bound:
        raise ValueError(
            f"dirichlet weights cannot reach kappa={kappa:g} at batch_size={batch_size}: "
            f"simplex weights need kappa < sqrt(B-1)/B = {bound:.6g}"
        )
    alpha = ((batch_size - 1) / (batch_size**2 * kappa**2) - 1.0) / batch_size
    # numpy's Dirichlet sampler is stable for small α; its seed comes from the given torch generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    pi = np.random.default_rng(seed).dirichlet(np.full(batch_size, alpha))
    return torch.as_tensor(pi, dtype=dtype)


def gamma(weights: torch.Tensor) -> float:
    """γ_t = B·Σ_b π_b² (Section 3, Theorem 1); equal to 1 for plain averaging and ≥ 1 when Σπ_b = 1.

    >>> gamma(torch.full((8,), 1 / 8))
    1.0
    """
    w = weights.detach().to(torch.float64).flatten()
    return float(w.numel() * (w * w).sum())


def zeta(weights: torch.Tensor) -> float:
    """ζ_t = Σ_b π_b² (Appendix B), so that γ_t = B·ζ_t.

    >>> zeta(torch.full((4,), 0.25))
    0.25
    """
    w = weights.detach().to(torch.float64).flatten()
    return float((w * w).sum())


def expected_gamma(kind: str | NoiseKind, batch_size: int, kappa: float) -> float:
    """γ̄ = E[γ_t] in closed form: 1 for ``"none"``, 1 + B²κ² for the three random kinds.

    For Gaussian and Rademacher E[π_b²] = 1/B² + κ²; for Dirichlet the same holds because every
    weight has mean 1/B and variance κ² by construction.

    >>> expected_gamma("gaussian", 512, kappa_from_ratio(2.0, 512))
    5.0
    """
    kind = NoiseKind.parse(kind)
    _check(batch_size, kappa)
    if kind is NoiseKind.NONE:
        return 1.0
    return 1.0 + batch_size**2 * kappa**2
