"""Softmax cross-entropy quantities, computed from log-probabilities so that they stay exact on saturated
outputs (a top probability of 1 - 1e-12 in float32): Tr(H_i), the directions u_ic = (p_i - e_c)/‖p_i - e_c‖,
the importance-sampling proposal q_ic ∝ p_ic ‖p_i - e_c‖² and the output-space products S_i u.

H_i = diag(p_i) - p_i p_iᵀ is the Hessian of the cross-entropy in the logits (Eq. 5). Nothing here forms
1 - p_top by subtraction: it is Σ_{c ≠ top} p_c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SoftmaxStats", "softmax_stats", "ggn_quadratic_form"]


@dataclass
class SoftmaxStats:
    """Per-sample (n, C) quantities of softmax probabilities p_i (see the module docstring)."""

    logp: torch.Tensor  # log p_ic
    p: torch.Tensor  # p_ic
    log1m_p: torch.Tensor  # log(1 - p_ic), exact for the top class
    one_minus_p: torch.Tensor  # 1 - p_ic, exact for the top class
    log_dist2: torch.Tensor  # log ‖p_i - e_c‖²
    top: torch.Tensor  # (n,) argmax class

    @property
    def log_trace_h(self) -> torch.Tensor:
        """log Tr(H_i) = log Σ_c p_ic ‖p_i - e_c‖² = log(1 - ‖p_i‖²), (n,)."""
        return torch.logsumexp(self.logp + self.log_dist2, dim=1)

    @property
    def trace_h(self) -> torch.Tensor:
        """Tr(H_i) = Σ_c p_ic (1 - p_ic), (n,); zero where it underflows."""
        return (self.p * self.one_minus_p).sum(1)

    def unit_direction(self, c: torch.Tensor) -> torch.Tensor:
        """u_i = (p_i - e_{c_i}) / ‖p_i - e_{c_i}‖ for one class per sample, (n, C), never NaN."""
        n = self.p.shape[0]
        rows = torch.arange(n, device=c.device)
        half = 0.5 * self.log_dist2[rows, c].unsqueeze(1)
        u = torch.exp(self.logp - half)
        u[rows, c] = -torch.exp(self.log1m_p[rows, c] - half[:, 0])
        return u

    def s_times(self, u: torch.Tensor) -> torch.Tensor:
        """S_i u_i with S_i = diag(√p_i) - p_i √p_iᵀ (so S_i S_iᵀ = H_i), rows of u, (n, C)."""
        sq = torch.exp(0.5 * self.logp)
        su = sq * u
        rest = su.sum(1, keepdim=True) - su  # Σ_{c' ≠ c} √p_c' u_c'
        rows = torch.arange(u.shape[0], device=u.device)
        top_rest = su.masked_fill(_top_mask(self.top, u), 0).sum(1)
        rest[rows, self.top] = top_rest
        return su * self.one_minus_p - self.p * rest


def _top_mask(top: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean (n, C) mask of each row's top class (one byte an entry, not one_hot's eight)."""
    return torch.zeros(like.shape, dtype=torch.bool, device=like.device).scatter_(1, top.unsqueeze(1), True)


def softmax_stats(logits: torch.Tensor) -> SoftmaxStats:
    """Compute :class:`SoftmaxStats` from (n, C) logits.

    >>> s = softmax_stats(torch.tensor([[0.0, 40.0]]))  # float32: 1 - p_top = 4e-18 is below eps
    >>> bool(s.trace_h[0] > 0), float(s.trace_h[0] / (2 * torch.exp(torch.tensor(-40.0))))
    (True, 1.0)
    """
    logits = logits.detach()
    n, num_classes = logits.shape
    logp = torch.log_softmax(logits, dim=1)
    p = torch.exp(logp)
    top = logp.argmax(1)
    rows = torch.arange(n, device=logits.device)
    onehot = _top_mask(top, logp)
    others = logp.masked_fill(onehot, -torch.inf)
    log_rest = torch.logsumexp(others, dim=1)  # log Σ_{c ≠ top} p_c = log(1 - p_top)
    log1m_p = torch.log1p(-p.clamp(max=0.5))  # exact for every non-top class (p_c ≤ 1/2 there)
    log1m_p[rows, top] = log_rest
    one_minus_p = 1.0 - p
    one_minus_p[rows, top] = torch.exp(log_rest)
    # log Σ_{c' ≠ c} p_c'²: for c ≠ top, ‖p‖² - p_c² ≥ p_top² has no cancellation; for top, sum directly.
    log_sq_all = torch.logsumexp(2 * logp, dim=1, keepdim=True)
    log_sq_wo = log_sq_all + torch.log1p(-torch.exp(2 * logp - log_sq_all).clamp(max=0.5))
    log_sq_wo[rows, top] = torch.logsumexp(2 * others, dim=1)
    log_dist2 = torch.logaddexp(log_sq_wo, 2 * log1m_p)
    return SoftmaxStats(logp, p, log1m_p, one_minus_p, log_dist2, top)


def ggn_quadratic_form(a: torch.Tensor, stats: SoftmaxStats) -> torch.Tensor:
    """aᵢᵀ H_i aᵢ = Σ_c p_ic (a_ic - p_i·a_i)² per row, written relative to the top class so that it
    stays exact on saturated softmax outputs; (n,).

    >>> s = softmax_stats(torch.tensor([[0.0, 0.0]], dtype=torch.float64))
    >>> float(ggn_quadratic_form(torch.tensor([[1.0, -1.0]], dtype=torch.float64), s))
    1.0
    """
    rows = torch.arange(a.shape[0], device=a.device)
    delta = a - a[rows, stats.top].unsqueeze(1)
    mean = (stats.p * delta).sum(1, keepdim=True)
    return (stats.p * (delta - mean) ** 2).sum(1)
