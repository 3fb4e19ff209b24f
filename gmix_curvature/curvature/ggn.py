"""``ggn_trace``: Tr(G(θ)) (Eq. 5, the mean over samples) by any of the methods, and ``method="auto"``.

The auto rule (measurements in theory/CURVATURE.md): a per-sample-norm pass costs the same whether it
serves the exact method (C passes, one per class) or one probe of ``fisher_is``. The stochastic
estimate to a relative standard error r needs about (relative sd of a pass / r)² passes, and the
relative sd of a pass falls as 1/√n. A standard error needs at least ``AUTO_PILOT`` = 8 probe values to
be trusted, so with C ≤ ``AUTO_EXACT_MAX_CLASSES`` = 16 classes exact costs at most twice the pilot alone
and runs directly; otherwise a pilot of ``AUTO_PILOT`` ``fisher_is`` probes runs and continues to the
target only when that is predicted to take fewer passes than exact's C; else exact runs (the result then
records the pilot's cost).
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._data import as_batches
from gmix_curvature.curvature._engine import OverBudget, run_per_sample
from gmix_curvature.curvature._model import bn_mode_context, has_batchnorm, model_device_dtype
from gmix_curvature.curvature._result import CurvatureResult
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

__all__ = ["GGNMethod", "ggn_trace", "AUTO_PILOT", "AUTO_EXACT_MAX_CLASSES", "DEFAULT_TARGET"]

AUTO_PILOT = 8  # = MIN_PROBES_FOR_TARGET: fewer probe values give no trustworthy standard error
AUTO_EXACT_MAX_CLASSES = 2 * AUTO_PILOT  # exact costs C passes: at most twice the pilot alone
DEFAULT_TARGET = 0.01  # the "1 %" of the goals


class GGNMethod(str, Enum):
    """The methods of :func:`ggn_trace`."""

    AUTO = "auto"
    EXACT = "exact"
    HUTCHINSON = "hutchinson"
    FISHER_MC = "fisher_mc"
    FISHER_IS = "fisher_is"
    OUTPUT_HUTCHINSON = "output_hutchinson"

    @classmethod
    def parse(cls, name: str | GGNMethod) -> GGNMethod:
        try:
            return cls(name)
        except ValueError:
            raise GmixError(f"unknown method {name!r}; valid: {', '.join(m.value for m in cls)}") from None


def _num_classes(model: nn.Module, data: Any, bn_mode: str, batch_size: int | None) -> int:
    device, dtype = model_device_dtype(model)
    for _, x, _ in as_batches(data, batch_size=batch_size or 8, device=device, dtype=dtype):
        with torch.no_grad(), bn_mode_context(model, bn_mode):
            out = model(x[:2])
        if out.ndim != 2:
            raise GmixError(f"the model must output (batch, classes) logits, got shape {tuple(out.shape)}")
        return int(out.shape[1])
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
) -> CurvatureResult:
    """Tr(G(θ)) of softmax cross-entropy, G = (1/n) Σ_i J_iᵀ H_i J_i (Eq. 5), by ``method``:

    ``exact`` (C per-sample-norm passes), ``fisher_is`` (importance-sampled labels), ``output_hutchinson``,
    ``fisher_mc`` (labels from the model; unreliable on confident models), ``hutchinson`` (parameter
    space, the paper's Table 1 method; also with ``bn_mode="train"``), or ``auto`` (see the module
    docstring; its target is ``target_rel_stderr`` or 1 %). ``data`` is an (x, y) pair, a data set or an
    iterable of batches; ``batch_size`` splits it further. The result's ``method`` says what ran,
    ``per_param`` holds the block traces.

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
    common = {"bn_mode": bn_mode, "batch_size": batch_size, "progress": progress}
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
    num_classes = _num_classes(model, data, bn_mode, batch_size)
    if num_classes <= AUTO_EXACT_MAX_CLASSES:
        r = exact_ggn_trace(model, data, backend=backend, **common)
        r.extra["auto"] = f"C = {num_classes} <= {AUTO_EXACT_MAX_CLASSES}: exact"
        return r
    try:
        r = run_per_sample(
            model, data, terms=_is_terms, method="fisher_is", num_probes=max(AUTO_PILOT, num_probes or 0),
            generator=generator, target_rel_stderr=target, max_probes=max_probes, backend=backend,
            budget=num_classes - 1, **common,
        )
        r.extra["auto"] = f"fisher_is to {target:g} in {r.n_probes} passes < C = {num_classes}"
        return r
    except OverBudget as over:
        r = exact_ggn_trace(model, data, backend=backend, **common)
        r.extra["auto"] = (
            f"pilot of {over.sums.k} fisher_is passes (relative stderr {over.sums.rel_stderr():.3g}) predicted "
            f">= C = {num_classes} passes to {target:g}: exact"
        )
        r.extra["pilot_passes"] = over.sums.k
        r.seconds = time.perf_counter() - start
        return r
