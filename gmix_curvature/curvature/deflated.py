"""``deflated_ggn_trace``: Tr(G) as the exact trace on a sketched top subspace plus importance-sampled labels
on the rest (Hutch++ / xtrace in spirit; derivation and variance argument in theory/DEFLATION.md).

With Q ∈ ℝ^{d×k} an orthonormal basis of G Ω (Ω Gaussian, from its own seed) and P = QQᵀ,

    Tr(G) = Tr(QᵀGQ) + Tr((I − P) G (I − P))                     (cyclicity, P² = P)

The first term is exact given Q: (1/n) Σ_t Σ_j (J_t q_j)ᵀ H_t (J_t q_j), k Jacobian-vector products. The
second is ``fisher_is`` (Eq. 5 with importance-sampled labels and random signs per position, so that the
cross terms between the positions of one sample vanish in expectation) applied to projected gradients:

    ‖(I − P) J_iᵀ v_i‖² = ‖J_iᵀ v_i‖² − Σ_j ⟨J_i q_j, v_i⟩²,

the first from the per-sample-norm engine, the second from the k stored products J_i q_j. Q is drawn
independently of the labels, so the estimate is unbiased given Q and hence unbiased. Where a few
directions carry most of Tr(G) and fisher_is is noisy along them, the residual's variance is far below
that of ``fisher_is``; where they do not (a model that generalises), the sketch costs about 2k passes
for little gain (measured: theory/DEFLATION.md §6).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from gmix_curvature.curvature._data import all_reduce_sum, as_batches
from gmix_curvature.curvature._engine import (
    _per_sample_norms,
    batch_generator,
    check_probes,
    make_generator,
    make_predictions,
    probe_seeds,
    run_rounds,
)
from gmix_curvature.curvature._loss import Loss, Predictions, get_loss, nothing_counted
from gmix_curvature.curvature._model import bn_mode_context, check_bn_mode, has_batchnorm, model_device_dtype, trainable
from gmix_curvature.curvature._outputs import OutputFn, call_model, resolve_output_fn
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature.sampled import fisher_is_terms
from gmix_curvature.errors import GmixError

__all__ = [
    "deflated_ggn_trace", "sketch_basis", "auto_rank", "DEFAULT_RANK", "AUTO_DEFLATE_MIN_PASSES",
    "SKETCH_PASSES_PER_COLUMN", "SKETCH_MEMORY_BUDGET",
]  # fmt: skip

DEFAULT_RANK = 16  # sketch columns k: the cost is about 2k passes (k GGN-vector products + k JVPs)
DEFAULT_PROBES = 8
_COLUMN_CHUNK = 8  # sketch columns per vmapped product
# The products J_i q_j of all batches are kept between probe rounds up to this many elements
# (k × the output's size); beyond it they are recomputed once per round.
JQ_CACHE_BUDGET = 2**26
METHOD = "fisher_is_deflated"
# A sketch column (one GGN-vector product, one JVP) costs about this many fisher_is passes (measured in
# bench/lm_trace.py on the char GPT: 1.6-2.5).
SKETCH_PASSES_PER_COLUMN = 2
# ggn_trace's auto deflates when its fisher_is pilot predicts at least this many passes to the target
# (theory/DEFLATION.md §5), with the rank whose sketch costs a quarter of them (AUTO_MIN_RANK..AUTO_MAX_RANK).
AUTO_DEFLATE_MIN_PASSES = 64
AUTO_MIN_RANK, AUTO_MAX_RANK = 4, 32


# The sketch holds about three k × d matrices (Ω, G Ω, Q); auto keeps one within this many elements (1 GiB in
# float32): a GPT-2-size model (124 M parameters) then gets k ≤ 2 < AUTO_MIN_RANK, i.e. no deflation.
SKETCH_MEMORY_BUDGET = 2**28


def auto_rank(predicted_passes: float, num_params: int) -> int:
    """The sketch rank ``auto`` takes when fisher_is is predicted to need ``predicted_passes`` passes on a model
    of ``num_params`` parameters: 0 (do not deflate) below ``AUTO_DEFLATE_MIN_PASSES``, else the k whose sketch
    costs a quarter of them, within 4..32 and k·d ≤ ``SKETCH_MEMORY_BUDGET`` (0 if that leaves k < 4).

    >>> auto_rank(10, 10**5), auto_rank(64, 10**5), auto_rank(100, 10**5), auto_rank(10_000, 10**5)
    (0, 8, 12, 32)
    >>> auto_rank(10_000, 124_000_000), auto_rank(math.inf, 10**5)  # GPT-2 small: rank 4 would not fit
    (0, 32)
    """
    if predicted_passes < AUTO_DEFLATE_MIN_PASSES:
        return 0
    k = int(min(AUTO_MAX_RANK, predicted_passes / (4 * SKETCH_PASSES_PER_COLUMN), SKETCH_MEMORY_BUDGET // num_params))
    return k if k >= AUTO_MIN_RANK else 0


def _functional(model: nn.Module, x: Any, output_fn: OutputFn) -> Callable[[dict], torch.Tensor]:
    """θ ↦ output_fn(model(x; θ)) for torch.func (x a tensor or a mapping of keyword inputs)."""
    buffers = dict(model.named_buffers())

    def f(p: dict) -> torch.Tensor:
        if isinstance(x, Mapping):
            return output_fn(functional_call(model, (p, buffers), (), dict(x)))
        return output_fn(functional_call(model, (p, buffers), (x,)))

    return f


def _columns(cols: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in cols.items()}


def _jvp_columns(f: Callable, params: dict, cols: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(θ), [J q_j]_j) for the k columns of ``cols`` (k leading), vmapped a chunk at a time."""
    k = next(iter(cols.values())).shape[0]
    outs, out = [], None
    for lo in range(0, k, _COLUMN_CHUNK):
        o, jq = vmap(lambda v: jvp(f, (params,), (v,)), randomness="same")(_columns(cols, lo, lo + _COLUMN_CHUNK))
        out = o[0]
        outs.append(jq)
    return out, torch.cat(outs)


def _ggn_columns(
    f: Callable, params: dict, cols: dict[str, torch.Tensor], predictions_of: Callable[[torch.Tensor], Predictions]
) -> dict[str, torch.Tensor]:
    """Σ_t J_tᵀ H_t J_t q_j over the counted predictions of one batch, for the k columns (a sum, not a mean)."""
    k = next(iter(cols.values())).shape[0]
    _, pullback = vjp(f, params)
    res: dict[str, list] = {name: [] for name in params}
    for lo in range(0, k, _COLUMN_CHUNK):
        o, jq = vmap(lambda v: jvp(f, (params,), (v,)), randomness="same")(_columns(cols, lo, lo + _COLUMN_CHUNK))
        pb = predictions_of(o[0])
        hjq = torch.stack([pb.to_output(pb.loss.h_times(pb.stats, pb.rows(a))) for a in jq])
        back = vmap(pullback)(hjq)[0]
        for name in params:
            res[name].append(back[name])
    return {name: torch.cat(v) for name, v in res.items()}


def _orthonormalise(y: dict[str, torch.Tensor], rel_tol: float) -> dict[str, torch.Tensor]:
    """Columns spanning y (k leading, one tensor per parameter) made orthonormal through their k × k Gram matrix
    (eigendecomposition in float64; directions below ``rel_tol`` of the largest eigenvalue dropped), block by
    block: no d × k matrix is ever concatenated."""
    k = next(iter(y.values())).shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64)
    for v in y.values():
        flat = v.reshape(k, -1).double()
        gram += (flat @ flat.T).cpu()
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > lam.max().clamp(min=0) * rel_tol if k else torch.zeros(0, dtype=torch.bool)
    if not bool(keep.any()):
        return {name: v.new_zeros((0, *v.shape[1:])) for name, v in y.items()}
    mix = (vec[:, keep] / lam[keep].sqrt()).T  # (k', k): Q = mix · Y
    return {name: torch.tensordot(mix.to(v), v, dims=1) for name, v in y.items()}


def sketch_basis(
    ggn_columns: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    params: dict[str, torch.Tensor],
    rank: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """An orthonormal basis Q (k columns, each a dict like ``params``) of G Ω, Ω a Gaussian d × k matrix drawn
    from ``seed``: the randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.1) that Hutch++
    and xtrace start from. ``ggn_columns`` maps k columns to G times them (any positive scale). Orthonormalised
    twice through the k × k Gram matrix (CholeskyQR2 in spirit), so QᵀQ = I to working precision; directions
    of a numerically rank-deficient sketch (k > rank G) are dropped. Memory: about 3 k·d elements.

    >>> a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    >>> q = sketch_basis(lambda c: {"w": c["w"] @ a}, {"w": torch.zeros(3, dtype=torch.float64)}, 3, 0)["w"]
    >>> q.shape, torch.allclose(q @ q.T, torch.eye(2, dtype=torch.float64)), round(float(q[:, 2].abs().max()), 12)
    (torch.Size([2, 3]), True, 0.0)
    """
    if rank == 0:
        return {k: p.new_zeros((0, *p.shape)) for k, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    omega = {k: torch.randn((rank, *p.shape), generator=g, dtype=torch.float64).to(p) for k, p in params.items()}
    y = {name: all_reduce_sum(v) for name, v in ggn_columns(omega).items()}  # every rank's batches
    del omega
    eps = torch.finfo(next(iter(params.values())).dtype).eps
    q = _orthonormalise(y, rel_tol=max(1e-12, 10 * eps))  # float32: singular values below 1e-3 of the top dropped
    return _orthonormalise(q, rel_tol=0.5)  # second pass: every eigenvalue is ≈ 1, none is dropped


def deflated_ggn_trace(
    model: nn.Module,
    data: Any,
    *,
    rank: int = DEFAULT_RANK,
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
    """Tr(G) (Eq. 5; the mean over the counted predictions, theory/CURVATURE.md §8) as Tr(QᵀGQ) on a sketched
    rank-``rank`` subspace plus ``fisher_is`` on the projected gradients (module docstring; theory/DEFLATION.md).

    Costs ``rank`` GGN-vector products and ``rank`` Jacobian-vector products (about 2·rank passes) before
    ``num_probes`` per-sample-norm passes (or, with ``target_rel_stderr``, as many as needed, at most
    ``max_probes``); ``rank=0`` is plain ``fisher_is``. The standard error is that of the residual: Tr(QᵀGQ)
    is exact given Q. ``extra["captured"]`` holds Tr(QᵀGQ), ``extra["captured_fraction"]`` its share of the
    estimate. ``per_param`` holds the undeflated ``fisher_is`` block traces of the same draws (unbiased,
    noisier; they sum to the estimate only in expectation). Losses, outputs, ``ignore_index`` and
    ``output_fn`` as in :func:`~gmix_curvature.curvature.ggn.ggn_trace`.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> x = torch.randn(64, 4, dtype=torch.float64); y = torch.zeros(64, dtype=torch.int64)
    >>> r = deflated_ggn_trace(net, (x, y), rank=4, num_probes=8, generator=0)
    >>> from gmix_curvature.curvature.exact import exact_ggn_trace
    >>> abs(r.value - exact_ggn_trace(net, (x, y)).value) < 4 * r.stderr, r.extra["captured_fraction"] > 0.5
    (True, True)
    """
    start = time.perf_counter()
    check_bn_mode(bn_mode)
    check_probes(num_probes, target_rel_stderr, max_probes)
    loss_ = get_loss(loss)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise GmixError(f"rank must be an int >= 0, got {rank!r}")
    if bn_mode == "train" and has_batchnorm(model):
        raise GmixError(f"method {METHOD!r} needs independent per-sample terms: use bn_mode='eval'")
    out_fn = resolve_output_fn(output_fn)
    gen = make_generator(generator)
    sketch_seed = probe_seeds(gen, 1)[0]  # Ω's seed: independent of every label and sign drawn below
    with bn_mode_context(model, bn_mode):
        params = trainable(model)
        names = list(params)
        detached = {k: p.detach() for k, p in params.items()}
        device, dtype = model_device_dtype(model)
        batches = as_batches(data, batch_size=batch_size, device=device, dtype=dtype)  # re-iterable
        rank = min(rank, sum(p.numel() for p in params.values()))

        def predictions_of(y: torch.Tensor) -> Callable[[torch.Tensor], Predictions]:
            return lambda out: make_predictions(out.detach(), y, loss_, ignore_index)

        # 0. the predictions, checked before any product is spent
        n_pred = n_samples = 0
        for _, x, y in batches:
            with torch.no_grad():
                pb = predictions_of(y)(out_fn(call_model(model, x)))
            n_pred, n_samples = n_pred + pb.count, n_samples + pb.n_samples
        n_pred = int(all_reduce_sum(torch.tensor(float(n_pred), dtype=torch.float64)).item())
        n_samples = int(all_reduce_sum(torch.tensor(float(n_samples), dtype=torch.float64)).item())
        if n_samples == 0:
            raise GmixError("the data is empty: no samples to measure curvature on")
        if n_pred == 0:
            raise GmixError(nothing_counted(loss_, ignore_index))

        # 1. the sketch: Q = orth(G Ω)
        t0 = time.perf_counter()

        def ggn_all(cols: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            total = {k: torch.zeros_like(v) for k, v in cols.items()}
            for _, x, y in batches:
                part = _ggn_columns(_functional(model, x, out_fn), detached, cols, predictions_of(y))
                for k in total:
                    total[k] += part[k]
            return total

        basis = sketch_basis(ggn_all, detached, rank, sketch_seed)
        k = next(iter(basis.values())).shape[0]
        sketch_seconds = time.perf_counter() - t0

        # 2. J_i Q per batch (kept up to JQ_CACHE_BUDGET elements), and Tr(QᵀGQ) exactly
        jq_cache: dict[int, torch.Tensor] = {}
        budget = [JQ_CACHE_BUDGET]

        def jq_of(idx: int, x: Any, out: torch.Tensor) -> torch.Tensor:
            if idx in jq_cache:
                return jq_cache[idx]
            if k == 0:  # G Ω = 0 or rank 0: nothing to deflate
                return out.new_zeros((0, *out.shape))
            jq = _jvp_columns(_functional(model, x, out_fn), detached, basis)[1].detach()  # (k, *out.shape)
            if jq.numel() <= budget[0]:
                jq_cache[idx] = jq
                budget[0] -= jq.numel()
            return jq

        captured_sum = torch.zeros((), dtype=torch.float64)
        for idx, x, y in batches:
            with torch.no_grad():
                out = out_fn(call_model(model, x))
            pb = predictions_of(y)(out)
            for a in jq_of(idx, x, out):
                captured_sum += pb.loss.quadratic_form(pb.stats, pb.rows(a)).sum(dtype=torch.float64).cpu()
        captured_sum = float(all_reduce_sum(captured_sum))
        captured_seconds = time.perf_counter() - t0 - sketch_seconds

        # 3. fisher_is's draws (one column per counted prediction, a sign per position) on (I − P) J_iᵀ v_i
        psn = _per_sample_norms(model, params, backend, output_fn)

        def run_round(seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
            totals = torch.zeros(len(seeds), dtype=torch.float64)
            blocks = torch.zeros(len(seeds), len(names), dtype=torch.float64)
            per_sample = []  # (k, N) per batch: the residual's per-sample terms (ProbeSums' standard error)
            for idx, x, y in batches:
                out = psn.forward(x)
                pb = predictions_of(y)(out)
                if pb.count == 0:
                    continue
                jq = jq_of(idx, x, out).flatten(2)  # (k, N, rest)
                zero = torch.zeros(pb.n_samples, dtype=torch.float64, device=out.device)
                mine = torch.zeros(len(seeds), pb.n_samples, dtype=torch.float64)
                for j, seed in enumerate(seeds):
                    for w, v in fisher_is_terms(pb, batch_generator(seed, idx), {}):
                        norms = psn.norms(v)
                        per = torch.stack([norms[name].double() if name in norms else zero for name in names])
                        proj = (jq * v.flatten(1)).sum(-1).double()  # (k, N): ⟨J_i q_j, v_i⟩
                        w = w.double()
                        blocks[j] += (per * w).sum(1).cpu()
                        terms = ((per.sum(0) - proj.square().sum(0)) * w).cpu()
                        totals[j] += terms.sum()
                        mine[j] += terms
                per_sample.append(mine)
            per = torch.cat(per_sample, 1) if per_sample else torch.zeros(len(seeds), 0, dtype=torch.float64)
            return all_reduce_sum(totals) + captured_sum, all_reduce_sum(blocks), n_pred, n_samples, per

        sums = run_rounds(run_round, names, gen, num_probes, target_rel_stderr, max_probes or 10_000)
    value, stderr = sums.value()
    per_param, per_param_se = sums.per_param()
    captured = captured_sum / n_pred
    extra = {
        "backend": psn.backend,
        "loss": loss_.name,
        "rank": k,
        "captured": captured,
        "captured_fraction": captured / value if value else math.nan,
        "sketch_seconds": sketch_seconds,
        "captured_seconds": captured_seconds,
        "n_predictions": n_pred,
        "probe_values": sums.probe_values(),
        **sums.stderr_basis(),
    }
    if target_rel_stderr is not None:
        extra["target_rel_stderr"] = target_rel_stderr
    return CurvatureResult(
        value=value, stderr=stderr, n_samples=n_samples, n_probes=sums.k, method=METHOD, bn_mode=bn_mode,
        seconds=time.perf_counter() - start, per_param=per_param, per_param_stderr=per_param_se, extra=extra,
    )
