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
directions carry most of Tr(G) (a memorised batch) the residual's variance is far below that of
``fisher_is``; where they do not (a model that generalises), the sketch costs 3k passes for little gain.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from gmix_curvature.curvature._data import all_reduce_sum
from gmix_curvature.curvature._engine import (
    batch_generator,
    check_probes,
    make_generator,
    probe_seeds,
    run_rounds,
)
from gmix_curvature.curvature._model import bn_mode_context, check_bn_mode, has_batchnorm, model_device_dtype, trainable
from gmix_curvature.curvature._norms import PerSampleNorms
from gmix_curvature.curvature._outputs import OutputFn, resolve_output_fn
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature._softmax import SoftmaxStats, ggn_quadratic_form, softmax_stats
from gmix_curvature.errors import GmixError

__all__ = ["deflated_ggn_trace", "DEFAULT_RANK", "sketch_basis", "Positions"]

DEFAULT_RANK = 16  # sketch columns k: the cost is about 3k passes (k GGN-vector products + k JVPs)
DEFAULT_PROBES = 8
_COLUMN_CHUNK = 8  # sketch columns per vmapped product
# The products J_i q_j of all batches are kept between probe rounds up to this many elements
# (positions × classes × k); beyond it they are recomputed once per round.
JQ_CACHE_BUDGET = 2**26
LOSSES = ("cross_entropy",)


@contextlib.contextmanager
def _math_kernels() -> Iterator[None]:
    """Route attention around PyTorch's fused kernels, which have no forward-mode derivative: the math
    scaled-dot-product kernel and no ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` fast path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class Positions:
    """The predictions of one batch as rows: (N, C) logits, (N, T, C) (classes last) and the (N, C, d1, …)
    layout of ``F.cross_entropy``, each turned into (M, C) rows in sample-major order, with the labels
    (M,) and the mask of counted rows (label ≠ ``ignore_index``).

    >>> pos = Positions(torch.zeros(2, 3, 5), torch.tensor([[1, -100, 4], [0, 2, -100]]), -100)
    >>> tuple(pos.rows.shape), int(pos.counted.sum()), pos.per_sample
    ((6, 5), 4, 3)
    """

    def __init__(self, out: torch.Tensor, y: torch.Tensor, ignore_index: int) -> None:
        if out.ndim < 2 or out.shape[0] != y.shape[0]:
            raise GmixError(f"labels of shape {tuple(y.shape)} do not match the model output {tuple(out.shape)}")
        if tuple(out.shape[:-1]) == tuple(y.shape):
            self.class_dim = out.ndim - 1
        elif out.ndim >= 3 and tuple(out.shape[2:]) == tuple(y.shape[1:]):
            self.class_dim = 1
        else:
            raise GmixError(f"labels of shape {tuple(y.shape)} do not match the model output {tuple(out.shape)}")
        self.shape = tuple(out.shape)
        self.num_classes = int(out.shape[self.class_dim])
        if self.num_classes < 2:
            raise GmixError(f"cross-entropy needs at least 2 classes, the model outputs {self.shape}")
        self.rows = self.to_rows(out.detach())
        self.labels = y.reshape(-1)
        self.counted = self.labels != ignore_index
        lab = self.labels[self.counted]
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
            raise GmixError(f"labels out of range: found {int(lab.min())}..{int(lab.max())} for "
                            f"{self.num_classes} classes (ignore_index {ignore_index})")  # fmt: skip
        self.per_sample = self.rows.shape[0] // self.shape[0]

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(..., *output shape) -> (..., M, C): leading batch dimensions (e.g. sketch columns) kept."""
        lead = t.ndim - len(self.shape)
        return t.movedim(lead + self.class_dim, -1).reshape(*t.shape[:lead], -1, self.num_classes)

    def from_rows(self, r: torch.Tensor) -> torch.Tensor:
        """(M, C) rows -> the output's shape."""
        moved = list(self.shape)
        moved.append(moved.pop(self.class_dim))
        return r.reshape(moved).movedim(-1, self.class_dim)

    def per_sample_sum(self, r: torch.Tensor) -> torch.Tensor:
        """(..., M) -> (..., N): the sum over the positions of each sample."""
        return r.reshape(*r.shape[:-1], self.shape[0], self.per_sample).sum(-1)


def _iter_batches(data: Any, batch_size: int | None, device: torch.device, dtype: torch.dtype) -> list:
    """[(x, y)]: an (x, y) pair or an iterable of pairs; x a batch-first tensor or a mapping of them."""
    if isinstance(data, tuple | list) and len(data) == 2 and not isinstance(data[0], tuple | list):
        data = [data]
    out = []
    for batch in data:
        if not (isinstance(batch, tuple | list) and len(batch) >= 2):
            raise GmixError(f"each batch must be an (x, y) pair, got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        n = int(y.shape[0])
        step = batch_size or max(n, 1)
        for s in range(0, n, step):
            xs = {k: v[s : s + step].to(device) for k, v in x.items()} if isinstance(x, Mapping) else x[s : s + step]
            if isinstance(xs, torch.Tensor):
                xs = xs.to(device, dtype) if xs.dtype.is_floating_point else xs.to(device)
            out.append((xs, y[s : s + step].to(device)))
    if not out:
        raise GmixError("the data is empty: no samples to measure curvature on")
    return out


def _functional(model: nn.Module, x: Any, output_fn: OutputFn) -> Callable[[dict], torch.Tensor]:
    buffers = dict(model.named_buffers())

    def f(p: dict) -> torch.Tensor:
        if isinstance(x, Mapping):
            return output_fn(functional_call(model, (p, buffers), (), dict(x)))
        return output_fn(functional_call(model, (p, buffers), (x,)))

    return f


def _h_rows(a: torch.Tensor, stats: SoftmaxStats) -> torch.Tensor:
    """H_t a_t per row, written relative to the top class (exact on saturated outputs); a: (..., M, C)."""
    top = stats.top.expand(a.shape[:-1]).unsqueeze(-1)
    delta = a - a.gather(-1, top)
    return stats.p * (delta - (stats.p * delta).sum(-1, keepdim=True))


def _columns(cols: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in cols.items()}


def _jvp_columns(f: Callable, params: dict, cols: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(θ), [J q_j]_j) for the k columns of ``cols`` (k leading), vmapped a chunk at a time."""
    k = next(iter(cols.values())).shape[0]
    outs = []
    out = None
    for lo in range(0, k, _COLUMN_CHUNK):
        o, jq = vmap(lambda v: jvp(f, (params,), (v,)), randomness="same")(_columns(cols, lo, lo + _COLUMN_CHUNK))
        out = o[0]
        outs.append(jq)
    return out, torch.cat(outs)


def _ggn_columns(
    f: Callable, params: dict, cols: dict[str, torch.Tensor], pos_fn: Callable[[torch.Tensor], tuple]
) -> dict[str, torch.Tensor]:
    """Σ_t J_tᵀ H_t J_t q_j over the counted positions of one batch, for the k columns (a sum, not a mean)."""
    k = next(iter(cols.values())).shape[0]
    _, pullback = vjp(f, params)
    res: dict[str, list] = {name: [] for name in params}
    for lo in range(0, k, _COLUMN_CHUNK):
        chunk = _columns(cols, lo, lo + _COLUMN_CHUNK)
        o, jq = vmap(lambda v: jvp(f, (params,), (v,)), randomness="same")(chunk)
        pos, stats = pos_fn(o[0])
        hjq = _h_rows(pos.to_rows(jq), stats) * pos.counted.unsqueeze(-1)
        back = vmap(pullback)(torch.stack([pos.from_rows(r) for r in hjq]))[0]
        for name in params:
            res[name].append(back[name])
    return {name: torch.cat(v) for name, v in res.items()}


def sketch_basis(
    ggn_columns: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    params: dict[str, torch.Tensor],
    rank: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """An orthonormal basis Q (k columns, each a dict like ``params``) of G Ω, Ω a Gaussian d × k matrix drawn
    from ``seed``: the randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.1) that Hutch++
    and xtrace start from. ``ggn_columns`` maps k columns to G times them (any positive scale).

    >>> a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    >>> q = sketch_basis(lambda c: {"w": c["w"] @ a}, {"w": torch.zeros(3, dtype=torch.float64)}, 2, 0)["w"]
    >>> torch.allclose(q @ q.T, torch.eye(2, dtype=torch.float64)), round(float(q[:, 2].abs().max()), 12)
    (True, 0.0)
    """
    g = torch.Generator().manual_seed(seed)
    omega = {k: torch.randn((rank, *p.shape), generator=g, dtype=torch.float64).to(p) for k, p in params.items()}
    y = ggn_columns(omega)
    flat = torch.cat([all_reduce_sum(y[k]).reshape(rank, -1).double() for k in params], 1)  # (k, d)
    q, r = torch.linalg.qr(flat.T.cpu())
    keep = r.diagonal().abs() > r.diagonal().abs().max() * 1e-12 if rank else torch.zeros(0, dtype=torch.bool)
    q = q[:, keep].T  # drop columns of a numerically rank-deficient sketch (k > rank G)
    out, start = {}, 0
    for k, p in params.items():
        out[k] = q[:, start : start + p.numel()].reshape(q.shape[0], *p.shape).to(p)
        start += p.numel()
    return out


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
    loss: str = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
    progress: bool = False,
) -> CurvatureResult:
    """Tr(G) (Eq. 5, the mean over counted predictions) as Tr(QᵀGQ) on a sketched rank-``rank`` subspace plus
    ``fisher_is`` on the projected gradients (module docstring; theory/DEFLATION.md).

    Costs ``rank`` GGN-vector products and ``rank`` Jacobian-vector products (about 3·rank passes) before
    ``num_probes`` per-sample-norm passes (or, with ``target_rel_stderr``, as many as needed, at most
    ``max_probes``). The standard error is that of the residual: Tr(QᵀGQ) is exact given Q.
    ``extra["captured"]`` holds Tr(QᵀGQ) and ``extra["captured_fraction"]`` its share of the estimate.
    ``per_param`` holds the undeflated ``fisher_is`` block traces of the same draws (unbiased, noisier;
    they sum to the estimate only in expectation). Outputs (N, C), (N, T, C) or (N, C, d1, …) with
    token labels and ``ignore_index``; softmax cross-entropy.

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
    if loss not in LOSSES:
        raise GmixError(f"unknown loss {loss!r} for deflated_ggn_trace; valid: {', '.join(LOSSES)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise GmixError(f"rank must be an int >= 1, got {rank!r}")
    if bn_mode == "train" and has_batchnorm(model):
        raise GmixError("method 'deflated' needs independent per-sample terms: use bn_mode='eval'")
    out_fn = resolve_output_fn(output_fn)
    gen = make_generator(generator)
    sketch_seed = probe_seeds(gen, 1)[0]
    with bn_mode_context(model, bn_mode), _math_kernels():
        params = trainable(model)
        names = list(params)
        detached = {k: p.detach() for k, p in params.items()}
        device, dtype = model_device_dtype(model)
        batches = _iter_batches(data, batch_size, device, dtype)
        rank = min(rank, sum(p.numel() for p in params.values()))

        def pos_fn(y: torch.Tensor) -> Callable[[torch.Tensor], tuple]:
            def fn(out: torch.Tensor) -> tuple[Positions, SoftmaxStats]:
                pos = Positions(out, y, ignore_index)
                return pos, softmax_stats(pos.rows)

            return fn

        # 0. the predictions: counted positions, labels checked before any product is spent
        n_pred = n_samples = 0
        for x, y in batches:
            with torch.no_grad():
                pos = Positions(out_fn(model(**x) if isinstance(x, Mapping) else model(x)), y, ignore_index)
            n_pred += int(pos.counted.sum())
            n_samples += int(y.shape[0])
        n_pred = int(all_reduce_sum(torch.tensor(float(n_pred), dtype=torch.float64)).item())
        n_samples = int(all_reduce_sum(torch.tensor(float(n_samples), dtype=torch.float64)).item())
        if n_pred == 0:
            raise GmixError("every label is ignore_index: no predictions to measure curvature on")

        # 1. the sketch: Q = orth(G Ω)
        t0 = time.perf_counter()

        def ggn_all(cols: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            total = {k: torch.zeros_like(v) for k, v in cols.items()}
            for x, y in batches:
                part = _ggn_columns(_functional(model, x, out_fn), detached, cols, pos_fn(y))
                for k in total:
                    total[k] += part[k]
            return total

        basis = sketch_basis(ggn_all, detached, rank, sketch_seed)
        k = next(iter(basis.values())).shape[0]
        sketch_seconds = time.perf_counter() - t0

        # 2. J_i Q per batch (kept up to JQ_CACHE_BUDGET elements), and Tr(QᵀGQ) exactly
        jq_cache: dict[int, torch.Tensor] = {}
        budget = [JQ_CACHE_BUDGET]

        def jq_rows(idx: int, x: Any, pos: Positions) -> torch.Tensor:
            if idx in jq_cache:
                return jq_cache[idx]
            if k == 0:  # G Ω = 0: nothing to deflate
                return pos.rows.new_zeros((0, *pos.rows.shape))
            _, jq = _jvp_columns(_functional(model, x, out_fn), detached, basis)
            rows = pos.to_rows(jq) * pos.counted.unsqueeze(-1)  # (k, M, C)
            if rows.numel() <= budget[0]:
                jq_cache[idx] = rows
                budget[0] -= rows.numel()
            return rows

        captured_sum = torch.zeros((), dtype=torch.float64)
        for idx, (x, y) in enumerate(batches):
            with torch.no_grad():
                pos = Positions(out_fn(model(**x) if isinstance(x, Mapping) else model(x)), y, ignore_index)
            stats = softmax_stats(pos.rows)
            for r in jq_rows(idx, x, pos):
                captured_sum += (ggn_quadratic_form(r, stats) * pos.counted).sum(dtype=torch.float64).cpu()
        captured_sum = float(all_reduce_sum(captured_sum))
        captured_seconds = time.perf_counter() - t0 - sketch_seconds

        # 3. fisher_is on (I - P) J_iᵀ v_i, v_t = σ_t √Tr(H_t) u_t,c (c ~ q_t, σ_t = ±1)
        psn = PerSampleNorms(model, params, backend, output_fn=out_fn)

        def run_round(seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
            totals = torch.zeros(len(seeds), dtype=torch.float64)
            blocks = torch.zeros(len(seeds), len(names), dtype=torch.float64)
            for idx, (x, y) in enumerate(batches):
                out = psn.forward(x)
                pos = Positions(out, y, ignore_index)
                stats = softmax_stats(pos.rows)
                rows = jq_rows(idx, x, pos)
                zero = torch.zeros(out.shape[0], dtype=torch.float64, device=out.device)
                for j, seed in enumerate(seeds):
                    v = _is_vector(stats, pos, batch_generator(seed, idx))
                    norms = psn.norms(pos.from_rows(v))
                    per = torch.stack([norms[name].double() if name in norms else zero for name in names])
                    proj = pos.per_sample_sum((rows * v).sum(-1))  # (k, N) = ⟨J_i q_j, v_i⟩
                    blocks[j] += per.sum(1).cpu()
                    totals[j] += (per.sum() - proj.double().square().sum()).cpu()
            totals = all_reduce_sum(totals) + captured_sum
            return totals, all_reduce_sum(blocks), n_pred

        sums = run_rounds(run_round, names, gen, num_probes, target_rel_stderr, max_probes or 10_000)
    value, stderr = sums.value()
    per_param, per_param_se = sums.per_param()
    captured = captured_sum / n_pred
    extra = {
        "backend": psn.backend,
        "rank": k,
        "captured": captured,
        "captured_fraction": captured / value if value else math.nan,
        "sketch_seconds": sketch_seconds,
        "captured_seconds": captured_seconds,
        "n_predictions": n_pred,
        "probe_values": sums.probe_values(),
    }
    if target_rel_stderr is not None:
        extra["target_rel_stderr"] = target_rel_stderr
    return CurvatureResult(
        value=value, stderr=stderr, n_samples=n_samples, n_probes=sums.k, method="fisher_is_deflated",
        bn_mode=bn_mode, seconds=time.perf_counter() - start, per_param=per_param, per_param_stderr=per_param_se,
        extra=extra,
    )


def _is_vector(stats: SoftmaxStats, pos: Positions, g: torch.Generator) -> torch.Tensor:
    """v_t = σ_t √Tr(H_t) u_{t,c_t}, c_t ~ q_t ∝ p_tc ‖p_t − e_c‖², σ_t = ±1, zero where not counted: (M, C)
    rows with E[v_t v_tᵀ] = H_t and E[v_t v_sᵀ] = 0 for t ≠ s (theory/DEFLATION.md §2)."""
    logq = (stats.logp + stats.log_dist2).double().cpu()
    u = torch.rand(logq.shape, generator=g, dtype=torch.float64).clamp_(min=1e-300)
    c = (logq - torch.log(-torch.log(u))).argmax(1).to(stats.p.device)
    sign = (torch.randint(0, 2, (logq.shape[0],), generator=g) * 2 - 1).to(stats.p)
    scale = torch.exp(0.5 * stats.log_trace_h) * sign * pos.counted
    return stats.unit_direction(c) * scale.unsqueeze(1)
