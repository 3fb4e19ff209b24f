"""A cheap curvature record for the training engine to call every N steps (issue 10): Tr(G), the
empirical-Fisher trace, the top eigenvalue of G and the loss, on a fixed subset, in eval mode."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._data import all_reduce_sum, as_batches
from gmix_curvature.curvature._model import bn_mode_context, model_device_dtype
from gmix_curvature.curvature.eigen import top_eigenvalues
from gmix_curvature.curvature.empirical import empirical_fisher_trace
from gmix_curvature.curvature.ggn import ggn_trace

__all__ = ["curvature_snapshot"]


def _loss_accuracy(model: nn.Module, data: Any, batch_size: int | None, bn_mode: str) -> tuple[float, float]:
    device, dtype = model_device_dtype(model)
    acc = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad(), bn_mode_context(model, bn_mode):
        for _, x, y in as_batches(data, batch_size=batch_size, device=device, dtype=dtype):
            out = model(x)
            acc += torch.tensor([float(nn.functional.cross_entropy(out, y, reduction="sum")),
                                 float((out.argmax(1) == y).sum()), float(y.shape[0])], dtype=torch.float64)
    acc = all_reduce_sum(acc)
    return float(acc[0] / acc[2]), float(acc[1] / acc[2])


def curvature_snapshot(
    model: nn.Module,
    data: Any,
    *,
    method: str = "auto",
    generator: torch.Generator | int | None = None,
    num_probes: int | None = None,
    target_rel_stderr: float | None = None,
    eigenvalue: bool = True,
    eig_tol: float = 1e-3,
    batch_size: int | None = None,
    bn_mode: str = "eval",
) -> dict[str, Any]:
    """One JSON-ready record: ``ggn_trace`` (+ ``ggn_trace_stderr``, NaN when exact, and ``ggn_method``),
    ``empirical_fisher_trace``, ``top_eigenvalue`` of G (Lanczos to ``eig_tol``; NaN when
    ``eigenvalue=False``), ``loss`` and ``accuracy`` on ``data``, ``n_samples`` and ``seconds``.
    The model's train/eval modes and BatchNorm statistics are left as they were.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> snap = curvature_snapshot(net, (torch.randn(16, 4), torch.zeros(16, dtype=torch.int64)), generator=0)
    >>> sorted(snap)[:4], snap["ggn_method"]
    (['accuracy', 'empirical_fisher_trace', 'ggn_method', 'ggn_trace'], 'exact')
    """
    start = time.perf_counter()
    r = ggn_trace(model, data, method, num_probes=num_probes, generator=generator,
                  target_rel_stderr=target_rel_stderr, bn_mode=bn_mode, batch_size=batch_size)
    ef = empirical_fisher_trace(model, data, batch_size=batch_size, bn_mode="eval")
    top = math.nan
    if eigenvalue:
        top = top_eigenvalues(model, data, 1, bn_mode=bn_mode, batch_size=batch_size, tol=eig_tol).value
    loss, accuracy = _loss_accuracy(model, data, batch_size, bn_mode)
    return {
        "ggn_trace": r.value,
        "ggn_trace_stderr": r.stderr if r.stderr is not None else math.nan,
        "ggn_method": r.method,
        "empirical_fisher_trace": ef.value,
        "top_eigenvalue": top,
        "loss": loss,
        "accuracy": accuracy,
        "n_samples": r.n_samples,
        "seconds": time.perf_counter() - start,
    }
