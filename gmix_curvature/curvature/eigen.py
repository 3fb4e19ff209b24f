"""Top eigenvalues of G (Eq. 5) or of the Hessian of the mean loss, by Lanczos (``scipy.sparse.linalg.eigsh``)
on a LinearOperator whose products are exact GGN-/Hessian-vector products summed over all batches and
divided by the number of counted predictions (§8)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from gmix_curvature.curvature._data import all_reduce_sum, as_batches
from gmix_curvature.curvature._engine import count_non_finite, make_generator, make_predictions
from gmix_curvature.curvature._loss import Loss, get_loss, nothing_counted
from gmix_curvature.curvature._model import bn_mode_context, check_bn_mode, model_device_dtype, trainable
from gmix_curvature.curvature._outputs import OutputFn, predictions, resolve_output_fn
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature.hessian import hessian_vector_product
from gmix_curvature.curvature.hutchinson import ggn_vector_product
from gmix_curvature.errors import GmixError

__all__ = ["top_eigenvalues", "MATRICES"]

MATRICES = ("ggn", "hessian")


def top_eigenvalues(
    model: nn.Module,
    data: Any,
    k: int = 1,
    *,
    matrix: str = "ggn",
    bn_mode: str = "eval",
    batch_size: int | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
    generator: torch.Generator | int | None = 0,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """The k largest (algebraic) eigenvalues of G or of the Hessian; ``value`` is the largest,
    ``extra["eigenvalues"]`` all k in decreasing order, ``extra["matvecs"]`` the products used.
    ``loss``, ``ignore_index``, ``output_fn``: as for :func:`~gmix_curvature.curvature.exact_ggn_trace`.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> from gmix_curvature.curvature.reference import dense_ggn
    >>> r = top_eigenvalues(net, (x, torch.zeros(8, dtype=torch.int64)), k=2)
    >>> bool(np.allclose(r.extra["eigenvalues"], torch.linalg.eigvalsh(dense_ggn(net, x)).flip(0)[:2], rtol=1e-8))
    True
    """
    start = time.perf_counter()
    check_bn_mode(bn_mode)
    if matrix not in MATRICES:
        raise GmixError(f"unknown matrix {matrix!r}; valid: {', '.join(MATRICES)}")
    gen = make_generator(generator)
    loss_ = get_loss(loss)
    out_fn = resolve_output_fn(output_fn)
    products = {"loss": loss_, "ignore_index": ignore_index, "output_fn": out_fn}
    with bn_mode_context(model, bn_mode):
        params = trainable(model)
        names = list(params)
        shapes = [p.shape for p in params.values()]
        sizes = [p.numel() for p in params.values()]
        dim = sum(sizes)
        if not 1 <= k < dim:
            raise GmixError(f"k must lie in 1..{dim - 1} for a model with {dim} parameters, got {k}")
        device, dtype = model_device_dtype(model)
        batches = as_batches(data, batch_size=batch_size, device=device, dtype=dtype)
        n_samples = batches.count()
        n = 0
        with torch.no_grad():  # the counted predictions, and the outputs checked once
            for _, x, y in batches:
                pb = make_predictions(predictions(model, x, out_fn), y, loss_, ignore_index,
                                      lambda: count_non_finite(model, batches, out_fn))
                n += pb.count
        n = int(all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)).item())
        if n == 0:
            raise GmixError(nothing_counted(loss_, ignore_index))
        count = [0]

        def matvec(vec: np.ndarray) -> np.ndarray:
            count[0] += 1
            flat = torch.as_tensor(np.asarray(vec, dtype=np.float64).reshape(-1))
            v = {nm: t.reshape(s).to(device=device, dtype=dtype) for nm, t, s in zip(names, flat.split(sizes), shapes)}
            acc = torch.zeros(dim, dtype=torch.float64)
            for _, x, y in batches:
                if matrix == "ggn":
                    mv = ggn_vector_product(model, x, v, params, y=y, **products)
                else:
                    mv = hessian_vector_product(model, x, y, v, **products)
                acc += torch.cat([mv[nm].reshape(-1).double().cpu() for nm in names])
            return (all_reduce_sum(acc) / n).numpy()

        op = LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
        v0 = torch.randn(dim, generator=gen, dtype=torch.float64).numpy()
        vals = eigsh(op, k=k, which="LA", tol=tol, maxiter=maxiter, v0=v0, return_eigenvectors=False)
    vals = sorted((float(v) for v in vals), reverse=True)
    return CurvatureResult(
        value=vals[0], stderr=None, n_samples=n_samples, n_probes=0, method="lanczos", bn_mode=bn_mode,
        seconds=time.perf_counter() - start, quantity=f"{matrix}_top_eigenvalues",
        extra={"eigenvalues": vals, "matvecs": count[0], "matrix": matrix, "tol": tol, "loss": loss_.name,
               "n_predictions": n},
    )
