"""Stochastic Tr(G) from per-sample norms: labels from the model (``fisher_mc``), importance-sampled
labels (``fisher_is``) and output-space Hutchinson probes (``output_hutchinson``).

All three are unbiased for Tr(G) = (1/n) Σ_i Tr(J_iᵀ H_i J_i) (Eq. 5); one *probe* is one pass over all
samples with fresh draws for every sample, so the standard error comes from the spread of per-probe means.

* ``fisher_mc``: c_i ~ p_i, term ‖J_iᵀ(p_i - e_c)‖² (the Fisher equals the GGN for softmax cross-entropy).
  Once the model is confident the draws almost never leave the predicted class, which carries almost
  none of the trace: the estimate collapses and its standard error with it. The result reports the
  effective sample size, ``num_probes · Σ_i (1 - max_c p_ic)``, the expected number of draws off the
  predicted class, and warns (:class:`EstimatorWarning`) when it is below ``MIN_EFFECTIVE_DRAWS``.
* ``fisher_is``: c_i ~ q_i with q_ic ∝ p_ic ‖p_i - e_c‖², weight p_ic / q_ic. The term is then
  Tr(H_i) · u_cᵀ J_i J_iᵀ u_c with u_c the unit vector along p_i - e_c: Tr(H_i) times a Rayleigh quotient
  of J_i J_iᵀ, bounded by Tr(H_i)·λ_max(J_i J_iᵀ) however confident the model (theory/CURVATURE.md).
* ``output_hutchinson``: u_i ∈ {±1}^C, term ‖J_iᵀ S_i u_i‖², Hutchinson on the C×C matrix
  S_iᵀ J_i J_iᵀ S_i, whose relative variance is at most 2 (theory/CURVATURE.md).

Sequences, pixels and multi-label heads (§8): one draw per counted prediction t, all positions of a sample in
one backward pass. ``fisher_is`` gives each position an independent Rademacher sign, so that the cross terms
⟨J_tᵀ v_t, J_t'ᵀ v_t'⟩ of the per-sample norm vanish in expectation; the vectors of ``fisher_mc`` (p_t − e_c,
c ~ p_t) and ``output_hutchinson`` (S_t u_t) have mean zero already. Every loss of ``_loss`` works the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._engine import ProbeSums, row_terms, run_per_sample
from gmix_curvature.curvature._loss import Loss, Predictions, sample_categorical
from gmix_curvature.curvature._outputs import OutputFn
from gmix_curvature.curvature._result import CurvatureResult, EstimatorWarning

__all__ = [
    "fisher_mc_ggn_trace",
    "fisher_is_ggn_trace",
    "output_hutchinson_ggn_trace",
    "MIN_EFFECTIVE_DRAWS",
    "DEFAULT_PROBES",
    "fisher_is_terms",
    "fisher_mc_terms",
    "output_hutchinson_terms",
]

DEFAULT_PROBES = 16
# Fewer expected draws off the predicted class than this and the spread of the probes says nothing:
# a Poisson count with mean 30 still has a relative spread of 18 %.
MIN_EFFECTIVE_DRAWS = 30.0


def fisher_is_terms(pb: Predictions, g: torch.Generator, diag: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One column c_t ~ q_t ∝ ‖S_t e_c‖² per counted prediction, weight Tr(H_t), and with several positions
    per sample an independent Rademacher sign per position (the cross terms vanish in expectation, §8)."""
    loss, s = pb.loss, pb.stats
    log_w = loss.log_column_weights(s)
    c = sample_categorical(log_w, g)
    yield row_terms(pb, torch.logsumexp(log_w, dim=1), loss.column_unit(s, c), signs=g)  # Σ_c ‖S e_c‖² = Tr(H)


def fisher_mc_terms(pb: Predictions, g: torch.Generator, diag: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The gradient at one label per counted prediction drawn from the model; zero-mean per position, so
    no signs are needed for the cross terms to vanish in expectation."""
    log_w, unit = pb.loss.model_gradient(pb.stats, g, diag)
    yield row_terms(pb, log_w, unit)


def output_hutchinson_terms(pb: Predictions, g: torch.Generator, diag: dict) -> Iterator[tuple]:
    """S_t u_t with u_t ∈ {±1}^K independent per counted prediction (zero-mean: no cross terms on average)."""
    u = (torch.randint(0, 2, pb.f.shape, generator=g) * 2 - 1).to(pb.f)
    yield torch.ones(pb.n_samples, dtype=pb.f.dtype, device=pb.f.device), pb.to_output(pb.loss.s_times(pb.stats, u))


# the names of issue 9's code, kept for callers
_is_terms, _mc_terms, _oh_terms = fisher_is_terms, fisher_mc_terms, output_hutchinson_terms


def _mc_finish(diag: dict, sums: ProbeSums) -> dict:
    if "expected_off_top" not in diag:  # mse: Gaussian labels, no predicted class to collapse onto
        return {}
    ess = diag.get("expected_off_top", 0.0)
    out = {"effective_sample_size": ess, "draws_off_top": diag.get("draws_off_top", 0.0)}
    if ess < MIN_EFFECTIVE_DRAWS:
        out["warning"] = (
            f"fisher_mc: the model is too confident for its standard error to be trusted: "
            f"{ess:.3g} expected draws off the predicted class (< {MIN_EFFECTIVE_DRAWS:g}); use fisher_is"
        )
        warnings.warn(out["warning"], EstimatorWarning, stacklevel=4)
    return out


def fisher_mc_ggn_trace(
    model: nn.Module,
    data: Any,
    *,
    num_probes: int = DEFAULT_PROBES,
    generator: torch.Generator | int | None = None,
    target_rel_stderr: float | None = None,
    max_probes: int | None = None,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """Tr(G) with labels drawn from the model's own softmax (the textbook Monte Carlo Fisher, Eq. 5).

    Kept as the baseline other libraries use; it fails on confident models (see the module docstring):
    ``result.extra["effective_sample_size"]`` and an :class:`EstimatorWarning` say when.

    ``num_probes`` passes over the data (each with fresh draws for every sample), or with
    ``target_rel_stderr`` as many as needed (at least ``num_probes``, at most ``max_probes``);
    ``generator`` is a ``torch.Generator`` or an int seed. The draws of a probe on a batch depend only on
    the probe's seed and the batch index, so ``torchrun`` gives the single-process result.
    ``per_param`` holds the block traces Tr(G_ll), ``per_param_stderr`` their standard errors.
    ``loss``, ``ignore_index``, ``output_fn``: as for :func:`~gmix_curvature.curvature.exact_ggn_trace`; one
    draw per counted prediction (§8).
    """
    return run_per_sample(
        model, data, num_probes=num_probes, generator=generator, target_rel_stderr=target_rel_stderr,
        max_probes=max_probes, bn_mode=bn_mode, batch_size=batch_size, backend=backend, progress=progress,
        terms=_mc_terms, loss=loss, ignore_index=ignore_index, output_fn=output_fn, method="fisher_mc",
        finish=_mc_finish,
    )


def fisher_is_ggn_trace(
    model: nn.Module,
    data: Any,
    *,
    num_probes: int = DEFAULT_PROBES,
    generator: torch.Generator | int | None = None,
    target_rel_stderr: float | None = None,
    max_probes: int | None = None,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """Tr(G) (Eq. 5) with importance-sampled labels, q_ic ∝ p_ic ‖p_i - e_c‖²: Tr(H_i) times a Rayleigh quotient.

    ``num_probes`` passes over the data (each with fresh draws for every sample), or with
    ``target_rel_stderr`` as many as needed (at least ``num_probes``, at most ``max_probes``);
    ``generator`` is a ``torch.Generator`` or an int seed. The draws of a probe on a batch depend only on
    the probe's seed and the batch index, so ``torchrun`` gives the single-process result.
    ``per_param`` holds the block traces Tr(G_ll), ``per_param_stderr`` their standard errors.
    ``loss``, ``ignore_index``, ``output_fn``: as for :func:`~gmix_curvature.curvature.exact_ggn_trace`; one
    draw per counted prediction (§8).

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> x = torch.randn(64, 4, dtype=torch.float64); y = torch.zeros(64, dtype=torch.int64)
    >>> r = fisher_is_ggn_trace(net, (x, y), num_probes=8, generator=0)
    >>> from gmix_curvature.curvature.exact import exact_ggn_trace
    >>> abs(r.value - exact_ggn_trace(net, (x, y)).value) < 4 * r.stderr
    True
    """
    return run_per_sample(
        model, data, num_probes=num_probes, generator=generator, target_rel_stderr=target_rel_stderr,
        max_probes=max_probes, bn_mode=bn_mode, batch_size=batch_size, backend=backend, progress=progress,
        terms=_is_terms, loss=loss, ignore_index=ignore_index, output_fn=output_fn, method="fisher_is",
    )


def output_hutchinson_ggn_trace(
    model: nn.Module,
    data: Any,
    *,
    num_probes: int = DEFAULT_PROBES,
    generator: torch.Generator | int | None = None,
    target_rel_stderr: float | None = None,
    max_probes: int | None = None,
    bn_mode: str = "eval",
    batch_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """Tr(G) (Eq. 5) with Rademacher probes u_i ∈ {±1}^C per sample in output space: ‖J_iᵀ S_i u_i‖².

    ``num_probes`` passes over the data (each with fresh draws for every sample), or with
    ``target_rel_stderr`` as many as needed (at least ``num_probes``, at most ``max_probes``);
    ``generator`` is a ``torch.Generator`` or an int seed. The draws of a probe on a batch depend only on
    the probe's seed and the batch index, so ``torchrun`` gives the single-process result.
    ``per_param`` holds the block traces Tr(G_ll), ``per_param_stderr`` their standard errors.
    ``loss``, ``ignore_index``, ``output_fn``: as for :func:`~gmix_curvature.curvature.exact_ggn_trace`; one
    draw per counted prediction (§8).
    """
    return run_per_sample(
        model, data, num_probes=num_probes, generator=generator, target_rel_stderr=target_rel_stderr,
        max_probes=max_probes, bn_mode=bn_mode, batch_size=batch_size, backend=backend, progress=progress,
        terms=_oh_terms, loss=loss, ignore_index=ignore_index, output_fn=output_fn, method="output_hutchinson",
    )
