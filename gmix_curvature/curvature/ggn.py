"""``ggn_trace``: Tr(G(θ)) (Eq. 5, the mean over the counted predictions) by any of the methods, and
``method="auto"``.

The auto rule (measurements in theory/CURVATURE.md §6, §8): a per-sample-norm pass costs the same whether it
serves the exact method (P·K passes per batch: one per position and class, P predictions of width K per
sample, K = C classes for cross-entropy) or one probe of ``fisher_is``. The stochastic estimate to a
relative standard error r needs about (relative sd of a pass / r)² passes, and the relative sd of a pass
falls as 1/√n. A standard error from the spread of probe totals needs at least ``AUTO_PILOT`` = 8 of them to
be trusted, so with P·K ≤ ``AUTO_EXACT_MAX_CLASSES`` = 16 exact costs at most twice the pilot alone and runs
directly; otherwise a pilot of ``fisher_is`` probes runs and continues to the target — its first round is
``AUTO_FIRST_ROUND`` = 4 probes, enough where the standard error rests on the per-sample terms (many samples
carry the variance, theory/CURVATURE.md §9), else it runs ``AUTO_PILOT`` before deciding; when that is predicted to
take P·K passes or more, exact runs instead (the result records the pilot's cost) — but only where
P·K ≤ ``AUTO_EXACT_MAX_PASSES`` = 1024. Beyond it (a language model: P·K ≥ 30k for a vocabulary of 30k–50k)
exact is never chosen and ``fisher_is`` runs to the target or ``max_probes`` — unless its pilot predicts
``AUTO_DEFLATE_MIN_PASSES`` = 64 passes or more: then ``fisher_is_deflated`` runs to the target with a sketch
of rank ``auto_rank`` costing at most a quarter of them (theory/DEFLATION.md §5). ``fisher_is`` for every
loss: for cross-entropy its per-prediction variance does not grow with the model's confidence (§2), unlike
``output_hutchinson``'s (§7: 14 % against 1.8 % a pass on a confident 100-class net); for ``bce`` the two
coincide (one logit per prediction); for ``mse`` it samples one of the D equal columns of S = √(2/D) I.
"""

from __future__ import annotations

import math
import time
from enum import Enum
from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._data import as_batches, slice_input
from gmix_curvature.curvature._engine import OverBudget, make_predictions, run_per_sample
from gmix_curvature.curvature._loss import Loss, get_loss
from gmix_curvature.curvature._model import bn_mode_context, has_batchnorm, model_device_dtype
from gmix_curvature.curvature._outputs import OutputFn, predictions
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature.deflated import AUTO_DEFLATE_MIN_PASSES, auto_rank, deflated_ggn_trace
from gmix_curvature.curvature.exact import exact_ggn_trace
from gmix_curvature.curvature.hutchinson import hutchinson_ggn_trace
from gmix_curvature.curvature.sampled import (
    DEFAULT_PROBES,
    _is_terms,
    fisher_is_ggn_trace,
    fisher_mc_ggn_trace,
    output_hutchinson_ggn_trace,
)
from gmix_curvature.errors import GmixError

__all__ = [
    "GGNMethod", "ggn_trace", "AUTO_PILOT", "AUTO_FIRST_ROUND", "AUTO_EXACT_MAX_CLASSES", "AUTO_EXACT_MAX_PASSES",
    "DEFAULT_TARGET",
]  # fmt: skip

AUTO_PILOT = 8  # = MIN_PROBES_FOR_TARGET: fewer probe values give no trustworthy standard error
# the first round: enough where the standard error rests on the per-sample terms (§9); from k values per
# sample the count of samples carrying the variance comes out low by (k + 1)/(k − 1) for Gaussian terms (3 at
# k = 2, 5/3 at k = 4), so 4 probes let the per-sample standard error serve batches of ~50 samples and more
AUTO_FIRST_ROUND = 4
AUTO_EXACT_MAX_CLASSES = 2 * AUTO_PILOT  # exact costs P·K passes: at most twice the pilot alone
AUTO_EXACT_MAX_PASSES = 1024  # beyond this many passes per batch exact is never chosen
DEFAULT_TARGET = 0.01  # the "1 %" of the goals


class GGNMethod(str, Enum):
    """The methods of :func:`ggn_trace`."""

    AUTO = "auto"
    EXACT = "exact"
    HUTCHINSON = "hutchinson"
    FISHER_MC = "fisher_mc"
    FISHER_IS = "fisher_is"
    OUTPUT_HUTCHINSON = "output_hutchinson"
    FISHER_IS_DEFLATED = "fisher_is_deflated"

    @classmethod
    def parse(cls, name: str | GGNMethod) -> GGNMethod:
        try:
            return cls(name)
        except ValueError:
            raise GmixError(f"unknown method {name!r}; valid: {', '.join(m.value for m in cls)}") from None


def _exact_passes(
    model: nn.Module, data: Any, bn_mode: str, batch_size: int | None, loss: Loss, ignore_index: int,
    output_fn: OutputFn | None,
) -> int:
    """P·K of the first batch: exact's backward passes per batch (P predictions of width K per sample)."""
    device, dtype = model_device_dtype(model)
    for _, x, y in as_batches(data, batch_size=batch_size or 8, device=device, dtype=dtype):
        with torch.no_grad(), bn_mode_context(model, bn_mode):
            pb = make_predictions(predictions(model, slice_input(x, 0, 2), output_fn), y[:2], loss, ignore_index)
        return pb.positions * pb.width
    raise GmixError("the data is empty: no samples to measure curvature on")


def ggn_trace(
    model: nn.Module,
    data: Any,
    method: str = "auto",
    *,
    num_probes: int | None = None,
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
    """Tr(G(θ)), G = (1/n) Σ_t J_tᵀ H_t J_t over the n counted predictions (Eq. 5 for (N, C) logits; §8), by
    ``method``:

    ``exact`` (P·K per-sample-norm passes per batch), ``fisher_is`` (importance-sampled labels), ``output_hutchinson``,
    ``fisher_mc`` (labels from the model; unreliable on confident models), ``hutchinson`` (parameter
    space, the paper's Table 1 method; also with ``bn_mode="train"``), or ``auto`` (see the module
    docstring; its target is ``target_rel_stderr`` or 1 %). ``data`` is an (x, y) pair, a data set or an
    iterable of batches; ``batch_size`` splits it further. The result's ``method`` says what ran,
    ``per_param`` holds the block traces. ``loss``: ``"cross_entropy"`` (logits (N, C), (N, T, C) or
    F.cross_entropy's (N, C, d1, …); integer labels, ``ignore_index`` not counted), ``"mse"`` or ``"bce"``
    (float targets of the output's shape); ``output_fn`` picks the logits out of what the model returns
    (default: a tensor, a tuple's first element, a mapping's or an object's ``logits``).

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> data = (torch.randn(32, 4, dtype=torch.float64), torch.zeros(32, dtype=torch.int64))
    >>> r = ggn_trace(net, data)
    >>> r.method, abs(r.value - sum(r.per_param.values())) < 1e-12
    ('exact', True)
    >>> ggn_trace(net, data, "lanczos")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gmix_curvature.errors.GmixError: unknown method 'lanczos'; valid: auto, exact, hutchinson, fisher_mc, ...
    """
    m = GGNMethod.parse(method)
    probes = DEFAULT_PROBES if num_probes is None else num_probes
    loss_ = get_loss(loss)
    common = {
        "bn_mode": bn_mode, "batch_size": batch_size, "progress": progress, "loss": loss_,
        "ignore_index": ignore_index, "output_fn": output_fn,
    }  # fmt: skip
    stochastic = {"generator": generator, "target_rel_stderr": target_rel_stderr, "max_probes": max_probes}
    if m is GGNMethod.EXACT:
        return exact_ggn_trace(model, data, backend=backend, **common)
    if m is GGNMethod.HUTCHINSON:
        return hutchinson_ggn_trace(model, data, num_probes=probes, **stochastic, **common)
    if m is not GGNMethod.AUTO:
        fn = {
            GGNMethod.FISHER_MC: fisher_mc_ggn_trace,
            GGNMethod.FISHER_IS: fisher_is_ggn_trace,
            GGNMethod.OUTPUT_HUTCHINSON: output_hutchinson_ggn_trace,
            GGNMethod.FISHER_IS_DEFLATED: deflated_ggn_trace,
        }[m]
        return fn(model, data, num_probes=probes, backend=backend, **stochastic, **common)
    # auto
    start = time.perf_counter()
    target = target_rel_stderr or DEFAULT_TARGET
    if bn_mode == "train" and has_batchnorm(model):
        r = hutchinson_ggn_trace(
            model, data, num_probes=probes, generator=generator, target_rel_stderr=target,
            max_probes=max_probes, **common,
        )
        r.extra["auto"] = "bn_mode='train' couples the samples: parameter-space Hutchinson"
        return r
    passes = _exact_passes(model, data, bn_mode, batch_size, loss_, ignore_index, output_fn)
    if passes <= AUTO_EXACT_MAX_CLASSES:
        r = exact_ggn_trace(model, data, backend=backend, **common)
        r.extra["auto"] = f"P·K = {passes} <= {AUTO_EXACT_MAX_CLASSES}: exact"
        return r
    affordable = passes <= AUTO_EXACT_MAX_PASSES
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    deflatable = not affordable and auto_rank(math.inf, num_params) > 0  # a sketch fits in memory
    try:
        r = run_per_sample(
            model, data, terms=_is_terms, method="fisher_is", num_probes=num_probes or AUTO_FIRST_ROUND,
            generator=generator, target_rel_stderr=target, max_probes=max_probes, backend=backend,
            budget=passes - 1 if affordable else AUTO_DEFLATE_MIN_PASSES - 1 if deflatable else None, **common,
        )
        r.extra["auto"] = (
            f"fisher_is to {target:g} in {r.n_probes} passes < P·K = {passes}" if affordable else
            f"fisher_is: exact would take P·K = {passes} > {AUTO_EXACT_MAX_PASSES} passes a batch"
        )
        return r
    except OverBudget as over:
        if deflatable:
            predicted = over.sums.k + over.sums.needed(target, max_probes or 10_000)
            rank = auto_rank(predicted, num_params)
            r = deflated_ggn_trace(
                model, data, rank=rank, num_probes=AUTO_PILOT, generator=generator, target_rel_stderr=target,
                max_probes=max_probes, backend=backend, **common,
            )
            why = f"{predicted} >= {AUTO_DEFLATE_MIN_PASSES} passes to {target:g}: fisher_is_deflated, rank {rank}"
        else:
            r = exact_ggn_trace(model, data, backend=backend, **common)
            why = f">= P·K = {passes} passes to {target:g}: exact"
        pilot = f"pilot of {over.sums.k} fisher_is passes (relative stderr {over.sums.rel_stderr():.3g}) predicted"
        r.extra["auto"] = f"{pilot} {why}"
        r.extra["pilot_passes"] = over.sums.k
        r.seconds = time.perf_counter() - start  # the pilot included
        return r
