"""A cheap curvature record for the training engine to call every N steps (issue 10): Tr(G), the
empirical-Fisher trace, the top eigenvalue of G and the loss, on a fixed subset, in eval mode.

Sequence models (the Fig. 3 Transformer's (B, L, V) logits with padded (B, L) targets) are measured as
the issue-15 convention says: G, the loss and the accuracy are means over the n counted predictions
(targets that are not ``ignore_index``); :func:`snapshot_options` reads ``ignore_index`` from a data set.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gmix_curvature.curvature._data import all_reduce_sum, as_batches
from gmix_curvature.curvature._loss import nothing_counted
from gmix_curvature.curvature._model import bn_mode_context, model_device_dtype
from gmix_curvature.curvature._outputs import OutputFn, predictions
from gmix_curvature.curvature.eigen import top_eigenvalues
from gmix_curvature.curvature.empirical import empirical_fisher_trace
from gmix_curvature.curvature.ggn import ggn_trace
from gmix_curvature.curvature.report import estimator_options
from gmix_curvature.errors import GmixError

__all__ = ["curvature_snapshot", "snapshot_options", "loss_sums"]


def snapshot_options(dataset: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`curvature_snapshot` that a data set implies: its padding label
    (``dataset.ignore_index``, Multi30k's ``<pad>``) when it has one.

    >>> from gmix_curvature.data import load_dataset
    >>> snapshot_options(load_dataset("digits", "test"))
    {}
    """
    index = getattr(dataset, "ignore_index", None)
    return {} if index is None or int(index) == -100 else {"ignore_index": int(index)}


def loss_sums(
    out: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy", ignore_index: int = -100
) -> torch.Tensor:
    """(summed loss, correct predictions, counted predictions) of one batch, float64, for means over the n counted
    predictions: cross-entropy over labels that are not ``ignore_index`` (classes in dim 1, or last for (N, T, C)
    logits with (N, T) labels); ``mse`` as ``F.mse_loss`` (squared errors averaged over the last dimension, one
    prediction per output vector, no accuracy: NaN); ``bce`` per output element, correct when σ(logit) > 1/2 agrees
    with target > 1/2. NaN float targets are not counted.

    >>> out = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # (N=1, T=2, C=2)
    >>> loss_sums(out, torch.tensor([[0, -100]])).tolist()[1:]
    [1.0, 1.0]
    """
    if loss == "cross_entropy":
        if out.ndim >= 3 and tuple(y.shape[1:]) == tuple(out.shape[1:-1]):
            out = out.movedim(-1, 1)
        counted = y != ignore_index
        total = F.cross_entropy(out.double(), y, ignore_index=ignore_index, reduction="sum")
        correct = ((out.argmax(1) == y) & counted).sum()
        return torch.stack([total, correct.double(), counted.sum().double()]).cpu()
    keep = ~torch.isnan(y)  # float targets: NaN marks a prediction that is not counted
    if loss == "mse":
        width = out.shape[-1] if out.ndim > 1 else 1
        total = F.mse_loss(out.double()[keep], y.double()[keep], reduction="sum") / width
        n = int(keep.sum()) // width
        return torch.stack([total, torch.tensor(math.nan, dtype=torch.float64), torch.tensor(float(n))]).cpu()
    if loss == "bce":
        total = F.binary_cross_entropy_with_logits(out.double()[keep], y.double()[keep], reduction="sum")
        correct = ((out > 0) == (y > 0.5))[keep].sum().double()
        return torch.stack([total, correct, keep.sum().double()]).cpu()
    raise GmixError(f"unknown loss {loss!r}; valid: cross_entropy, mse, bce")


def _loss_accuracy(
    model: nn.Module, data: Any, batch_size: int | None, bn_mode: str, loss: str, ignore_index: int,
    output_fn: OutputFn | None,
) -> tuple[float, float, int]:  # fmt: skip
    device, dtype = model_device_dtype(model)
    acc = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad(), bn_mode_context(model, bn_mode):
        for _, x, y in as_batches(data, batch_size=batch_size, device=device, dtype=dtype):
            acc += loss_sums(predictions(model, x, output_fn), y, loss, ignore_index)
    acc = all_reduce_sum(acc)
    if acc[2] == 0:
        raise GmixError(nothing_counted(loss, ignore_index))
    return float(acc[0] / acc[2]), float(acc[1] / acc[2]), int(acc[2])


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
    loss: str = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> dict[str, Any]:
    """One JSON-ready record: ``ggn_trace`` (Eq. 5, + ``ggn_trace_stderr``, NaN when exact, and ``ggn_method``),
    ``empirical_fisher_trace``, ``top_eigenvalue`` of G (Lanczos to ``eig_tol``; NaN when
    ``eigenvalue=False``), ``loss`` and ``accuracy`` on ``data``, ``n_samples``, ``n_predictions`` (the counted
    predictions that G, the loss and the accuracy are means over) and ``seconds``. ``loss``, ``ignore_index`` and
    ``output_fn`` go to every estimator. The model's train/eval modes and BatchNorm statistics are left as they
    were.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> snap = curvature_snapshot(net, (torch.randn(16, 4), torch.zeros(16, dtype=torch.int64)), generator=0)
    >>> sorted(snap)[:4], snap["ggn_method"], snap["n_predictions"]
    (['accuracy', 'empirical_fisher_trace', 'ggn_method', 'ggn_trace'], 'exact', 16)
    """
    start = time.perf_counter()
    kw = estimator_options(loss=loss, ignore_index=ignore_index, output_fn=output_fn)
    r = ggn_trace(model, data, method, num_probes=num_probes, generator=generator,
                  target_rel_stderr=target_rel_stderr, bn_mode=bn_mode, batch_size=batch_size, **kw)  # fmt: skip
    ef = empirical_fisher_trace(model, data, batch_size=batch_size, bn_mode="eval", **kw)
    top = math.nan
    if eigenvalue:
        top = top_eigenvalues(model, data, 1, bn_mode=bn_mode, batch_size=batch_size, tol=eig_tol, **kw).value
    value, accuracy, n_predictions = _loss_accuracy(model, data, batch_size, bn_mode, loss, ignore_index, output_fn)
    return {
        "ggn_trace": r.value,
        "ggn_trace_stderr": r.stderr if r.stderr is not None else math.nan,
        "ggn_method": r.method,
        "empirical_fisher_trace": ef.value,
        "top_eigenvalue": top,
        "loss": value,
        "accuracy": accuracy,
        "n_samples": r.n_samples,
        "n_predictions": n_predictions,
        "seconds": time.perf_counter() - start,
    }
