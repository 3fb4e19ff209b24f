"""Shared loop of the parameter-space Hutchinson estimators (GGN and Hessian): Rademacher probes v over
all trainable parameters, vᵀMv summed over batches; the block traces are v_lᵀ(Mv)_l (unbiased for
Tr(M_ll), since E[v_l v_mᵀ] = 0 for l ≠ m)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from gmix_curvature.curvature._data import all_reduce_sum, as_batches
from gmix_curvature.curvature._engine import _progress, check_probes, count_non_finite, make_generator, run_rounds
from gmix_curvature.curvature._loss import Loss, nothing_counted
from gmix_curvature.curvature._model import bn_mode_context, check_bn_mode, model_device_dtype, trainable
from gmix_curvature.curvature._outputs import OutputFn
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.errors import GmixError

__all__ = ["rademacher_like", "run_param_space", "functional_output"]

# batch_fn(params, x, y, probes, recount) -> (totals (K,), blocks (K, P), counted predictions) summed over the
# batch's predictions; recount() -> (samples with a non-finite output, samples) over all of this rank's data
BatchFn = Callable[..., tuple[torch.Tensor, torch.Tensor, int]]


def functional_output(
    model: nn.Module, x: Any, output_fn: OutputFn, buffers: dict[str, torch.Tensor]
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """p ↦ output_fn(model(x)) with the parameters p (``model(**x)`` for a mapping x)."""

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, Mapping):
            return output_fn(functional_call(model, (p, buffers), (), dict(x)))
        return output_fn(functional_call(model, (p, buffers), (x,)))

    return f


def rademacher_like(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A Rademacher vector over ``params``, from its own seed (identical on every rank and batch)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(device=p.device, dtype=p.dtype)
        for k, p in params.items()
    }


def run_param_space(
    model: nn.Module,
    data: Any,
    *,
    batch_fn: BatchFn,
    method: str,
    quantity: str,
    num_probes: int,
    generator: torch.Generator | int | None,
    target_rel_stderr: float | None,
    max_probes: int | None,
    bn_mode: str,
    batch_size: int | None,
    progress: bool,
    extra: dict | None = None,
    output_fn: OutputFn | None = None,
    ignore_index: int = -100,
    loss: str | Loss = "cross_entropy",
) -> CurvatureResult:
    start = time.perf_counter()
    check_bn_mode(bn_mode)
    check_probes(num_probes, target_rel_stderr, max_probes)
    gen = make_generator(generator)
    with bn_mode_context(model, bn_mode):
        params = trainable(model)
        names = list(params)
        device, dtype = model_device_dtype(model)
        batches = as_batches(data, batch_size=batch_size, device=device, dtype=dtype)

        def recount() -> tuple[int, int]:
            return count_non_finite(model, batches, output_fn)

        def run_round(seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
            probes = [rademacher_like(params, s) for s in seeds]
            totals = torch.zeros(len(seeds), dtype=torch.float64)
            blocks = torch.zeros(len(seeds), len(names), dtype=torch.float64)
            n = n_samples = 0
            for _, x, y in _progress(batches, method, progress):
                t, b, count = batch_fn(params, x, y, probes, recount)
                totals += t.double().cpu()
                blocks += b.double().cpu()
                n += count
                n_samples += int(y.shape[0])
            n_all = int(all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)).item())
            s_all = int(all_reduce_sum(torch.tensor(float(n_samples), dtype=torch.float64)).item())
            if s_all == 0:
                raise GmixError("the data is empty: no samples to measure curvature on")
            if n_all == 0:
                raise GmixError(nothing_counted(loss, ignore_index))
            return all_reduce_sum(totals), all_reduce_sum(blocks), n_all, s_all

        sums = run_rounds(run_round, names, gen, num_probes, target_rel_stderr, max_probes or 10_000)
    value, stderr = sums.value()
    per_param, per_param_se = sums.per_param()
    info = dict(extra or {})
    info["n_predictions"] = sums.n
    info["probe_values"] = sums.probe_values()
    if target_rel_stderr is not None:
        info["target_rel_stderr"] = target_rel_stderr
    return CurvatureResult(
        value=value, stderr=stderr, n_samples=sums.n_samples, n_probes=sums.k, method=method, bn_mode=bn_mode,
        seconds=time.perf_counter() - start, quantity=quantity, per_param=per_param, per_param_stderr=per_param_se,
        extra=info,
    )
