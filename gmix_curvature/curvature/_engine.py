"""The probe loop shared by the estimators built on per-sample norms, and the bookkeeping of every
stochastic estimate: per-probe sums over all predictions (all-reduced over ranks), their mean and standard
error, adaptive stopping at a target relative standard error, reproducible per-(probe, batch) draws.

The term machinery (theory/CURVATURE.md §8). For each batch the output becomes :class:`Predictions`
(counted rows f_t of width K, each with its loss's factor S_t, H_t = S_t S_tᵀ). A *term function*
``terms(pb, generator, diag)`` yields pairs (w, v): w an (N,) per-sample weight, v an output-shaped tensor;
the engine adds Σ_i w_i ‖J_iᵀ v_i‖² (per parameter, from :class:`PerSampleNorms`) to the probe's sum, where
J_iᵀ v_i = Σ_t J_tᵀ v_t sums over the sample's positions *inside* the norm. Helpers build the (w, v) of
the usual cases: :func:`position_terms` (one position at a time: no cross terms, exact) and
:func:`row_terms` (all positions at once, each row scaled by √weight, optionally with an independent
Rademacher sign per position so that the cross terms between positions vanish in expectation).
A probe's value is its sum divided by n, the number of counted predictions.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._data import all_reduce_sum, as_batches, world
from gmix_curvature.curvature._loss import Loss, Predictions, get_loss, nothing_counted
from gmix_curvature.curvature._model import bn_mode_context, check_bn_mode, has_batchnorm, model_device_dtype, trainable
from gmix_curvature.curvature._norms import PerSampleNorms
from gmix_curvature.curvature._outputs import OutputFn, model_output, predictions, resolve_output_fn
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.errors import GmixError

__all__ = [
    "OverBudget",
    "run_rounds",
    "make_generator",
    "probe_seeds",
    "batch_generator",
    "ProbeSums",
    "run_per_sample",
    "check_probes",
    "TermFn",
    "position_terms",
    "row_terms",
    "check_finite",
    "make_predictions",
]

_GOLDEN = 0x9E3779B97F4A7C15
# A standard error estimated from fewer probe values is too unreliable to stop on: per-probe values of a
# confident model are heavy-tailed or discrete (one dominant sample), and 4 equal values happen.
MIN_PROBES_FOR_TARGET = 8
# ... unless it rests on the per-sample terms (ProbeSums.sample_eff): with the variance spread over this many
# samples or more, 2 probes suffice (a relative error of the standard error of about 1/√(2·30) = 13 %).
MIN_SAMPLE_EFF = 30.0
# terms(predictions of a batch, generator of this probe on this batch, diagnostics) -> (w (N,), v output-shaped)
TermFn = Callable[[Predictions, torch.Generator, dict], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator: the one given, one seeded with an int, or (None) a fresh random seed agreed
    by all ranks. The global RNG is never touched."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        seed = torch.Generator().seed() % 2**52 if world()[0] == 0 else 0
        seed = int(all_reduce_sum(torch.tensor(float(seed), dtype=torch.float64)).item())
        return torch.Generator().manual_seed(seed)
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise GmixError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    return torch.Generator().manual_seed(int(generator))


def probe_seeds(gen: torch.Generator, k: int) -> list[int]:
    return [int(s) for s in torch.randint(0, 2**62, (k,), generator=gen, dtype=torch.int64)]


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator of one probe on one batch: independent of how batches are shared among ranks."""
    return torch.Generator().manual_seed((seed + (batch_index + 1) * _GOLDEN) % 2**63)


def check_probes(num_probes: int | None, target_rel_stderr: float | None, max_probes: int | None) -> None:
    if num_probes is not None and (isinstance(num_probes, bool) or num_probes < 1):
        raise GmixError(f"num_probes must be >= 1, got {num_probes}")
    if target_rel_stderr is not None and not (0 < target_rel_stderr < 1):
        raise GmixError(f"target_rel_stderr must lie in (0, 1), got {target_rel_stderr}")
    if max_probes is not None and max_probes < 2:
        raise GmixError(f"max_probes must be >= 2, got {max_probes}")


@dataclass
class ProbeSums:
    """Per-probe sums over the counted predictions of a stochastic estimate (total and per parameter); a
    probe's value is its sum / n.

    The standard error. A probe's total is a sum of per-sample terms X_i drawn independently for every sample
    (fresh labels, signs or probes per sample), so Var(total) = Σ_i Var(X_i). Where the engine passes the
    per-sample terms of each probe, Var(X_i) is estimated for every sample from its k values (s_i², unbiased)
    and the standard error of the mean is √(Σ_i s_i² / k) / n: the same quantity as the spread of the k probe
    totals, with up to N(k − 1) degrees of freedom instead of k − 1. How many samples carry the variance is
    ``sample_eff`` = (Σ s_i²)² / Σ s_i⁴ (Satterthwaite's degrees of freedom are (k − 1) times it, for Gaussian
    terms); it is small where a few samples carry the variance (a confident model's samples near a decision
    boundary; fisher_mc's rare draws off the predicted class, where each carrying sample is one rare event, so
    that the (k − 1) factor would overstate the reliability). The per-sample standard error is used when
    ``sample_eff`` ≥ ``MIN_SAMPLE_EFF``, else the spread of the probe totals (theory/CURVATURE.md §9).
    Per-parameter standard errors always come from the probe totals."""

    names: list[str]
    totals: list[float] = field(default_factory=list)
    blocks: list[list[float]] = field(default_factory=list)
    n: int = 0  # counted predictions: the divisor of every value
    n_samples: int = 0
    s1: torch.Tensor | None = None  # Σ_j X_ij and Σ_j X_ij² over the probes, per sample of this rank
    s2: torch.Tensor | None = None
    sample_var: float | None = None  # Σ_i s_i² over all ranks: the variance of one probe's total
    sample_eff: float = 0.0

    def add(
        self, totals: torch.Tensor, blocks: torch.Tensor, n: int, n_samples: int | None = None,
        per_sample: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """Add a round of k probes: their totals (k,), blocks (k, params), and optionally the per-sample terms
        (k, samples of this rank) whose sum over samples is ``totals`` (all ranks must pass them or none)."""
        self.totals += [float(t) for t in totals]
        self.blocks += blocks.tolist()
        self.n = n
        self.n_samples = n if n_samples is None else n_samples
        if per_sample is None:
            self.s1 = self.s2 = self.sample_var = None
            return
        x = per_sample.detach().to("cpu", torch.float64)
        first = self.k == len(totals)
        if not first and (self.s1 is None or self.s1.shape != x.shape[1:]):
            self.s1 = self.s2 = self.sample_var = None
            return
        self.s1 = x.sum(0) if first else self.s1 + x.sum(0)
        self.s2 = x.square().sum(0) if first else self.s2 + x.square().sum(0)
        if self.k < 2:
            return
        var = ((self.s2 - self.s1.square() / self.k) / (self.k - 1)).clamp_min(0)
        stats = all_reduce_sum(torch.stack([var.sum(), var.square().sum()]))
        self.sample_var = float(stats[0])
        q = float(stats[1])
        self.sample_eff = self.sample_var**2 / q if q > 0 else 0.0

    @property
    def k(self) -> int:
        return len(self.totals)

    @property
    def per_sample_se(self) -> bool:
        """Whether the standard error rests on the per-sample terms (see the class docstring)."""
        return self.sample_var is not None and self.k >= 2 and self.sample_eff >= MIN_SAMPLE_EFF

    def stderr_basis(self) -> dict[str, Any]:
        """What the standard error rests on, for a result's ``extra``: the per-sample terms or the probe totals,
        and how many samples carry the variance (``sample_eff``; 0 where the terms were not kept)."""
        basis = "per-sample terms" if self.per_sample_se else "probe totals"
        return {"stderr_basis": basis, "stderr_samples": self.sample_eff if self.sample_var is not None else 0.0}

    def value(self) -> tuple[float, float | None]:
        t = torch.tensor(self.totals, dtype=torch.float64) / self.n
        if self.per_sample_se:
            return float(t.mean()), math.sqrt(self.sample_var / self.k) / self.n
        se = float(t.std() / math.sqrt(self.k)) if self.k >= 2 else None
        return float(t.mean()), se

    def probe_values(self) -> list[float]:
        """The estimate of each probe alone (its sum over predictions / n)."""
        return [t / self.n for t in self.totals]

    def rel_stderr(self) -> float:
        v, se = self.value()
        if se is None:
            return math.inf
        return se / abs(v) if v != 0 else (0.0 if se == 0 else math.inf)

    def per_param(self) -> tuple[dict[str, float], dict[str, float]]:
        b = torch.tensor(self.blocks, dtype=torch.float64).reshape(self.k, len(self.names)) / self.n
        mean = dict(zip(self.names, b.mean(0).tolist()))
        se = dict(zip(self.names, (b.std(0) / math.sqrt(self.k)).tolist())) if self.k >= 2 else {}
        return mean, se

    def needed(self, target: float, cap: int) -> int:
        """Probes still to run to reach ``target`` (0 when reached or at the cap)."""
        if self.k >= cap:
            return 0
        rel = self.rel_stderr()
        if rel <= target:
            return 0
        want = math.ceil(self.k * (rel / target) ** 2 * 1.1) if math.isfinite(rel) else 2 * self.k
        return max(1, min(cap, want) - self.k)


def _progress(iterable: Any, desc: str, progress: bool) -> Any:
    if not progress or world()[0] != 0:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def run_rounds(
    run_round: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor, int]],
    names: list[str],
    gen: torch.Generator,
    num_probes: int,
    target_rel_stderr: float | None,
    max_probes: int,
    budget: int | None = None,
) -> ProbeSums:
    """Run probes in rounds until ``num_probes`` are done and, with a target, the relative standard
    error reaches it (or ``max_probes`` ran). ``run_round(seeds)`` returns all-reduced per-probe sums (and,
    optionally, this rank's per-sample terms: :class:`ProbeSums`). With a target the first round is
    ``num_probes`` (at least 2); a prediction of the probes still needed is made only from a trusted standard
    error (the per-sample one, or at least ``MIN_PROBES_FOR_TARGET`` probe totals), else the probes run up to
    that many first. With ``budget``, raise :class:`OverBudget` as soon as a trusted prediction exceeds it."""
    sums = ProbeSums(names)
    todo = max(num_probes, 2) if target_rel_stderr is not None else num_probes
    while todo > 0:
        sums.add(*run_round(probe_seeds(gen, todo)))
        if target_rel_stderr is None:
            break
        if sums.per_sample_se or sums.k >= MIN_PROBES_FOR_TARGET:
            todo = sums.needed(target_rel_stderr, max_probes)
            if budget is not None and sums.k + todo > budget:
                raise OverBudget(sums)
        else:  # a standard error from the spread of the probe totals: not before 8 of them
            todo = max(0, min(MIN_PROBES_FOR_TARGET, max_probes) - sums.k)
    return sums


class OverBudget(Exception):
    """The target relative standard error would need more probes than the budget (see ``method="auto"``)."""

    def __init__(self, sums: ProbeSums) -> None:
        super().__init__("over budget")
        self.sums = sums


def check_finite(out: torch.Tensor, recount: Callable[[], tuple[int, int]] | None = None) -> None:
    """Raise one :class:`GmixError` line when a model output holds NaN or inf, naming how many samples are
    affected (over all of this rank's data when ``recount`` is given: it returns (affected, samples))."""
    bad = ~torch.isfinite(out.detach().reshape(out.shape[0], -1)).all(1) if out.ndim else ~torch.isfinite(out)
    if not bool(bad.any()):
        return
    affected, total = recount() if recount is not None else (int(bad.sum()), int(out.shape[0]))
    where = " on this rank" if world()[1] > 1 else ""
    raise GmixError(
        f"the model's output is not finite (NaN or inf) for {affected} of {total} samples{where}: "
        "check the checkpoint (a diverged run?) and the data"
    )


def count_non_finite(model: Any, batches: Iterable, output_fn: OutputFn | None) -> tuple[int, int]:
    """(samples whose output holds NaN or inf, samples) over ``batches`` of (index, x, y), without gradients."""
    affected = total = 0
    with torch.no_grad():
        for _, x, y in batches:
            out = predictions(model, x, output_fn)
            affected += int((~torch.isfinite(out.reshape(out.shape[0], -1))).any(1).sum())
            total += int(y.shape[0])
    return affected, total


def make_predictions(
    out: torch.Tensor, y: torch.Tensor, loss: Loss, ignore_index: int,
    recount: Callable[[], tuple[int, int]] | None = None,
) -> Predictions:
    """The checked :class:`Predictions` of one batch's output (finite, targets matching the loss)."""
    check_finite(out, recount)
    return Predictions(loss, out, y, ignore_index)


def position_terms(pb: Predictions, log_weight: torch.Tensor, unit: torch.Tensor) -> Iterator[tuple]:
    """(w, v) for one position at a time: v holds unit_t at position t only, w_i = exp(log_weight_t), so
    Σ_terms w_i ‖J_iᵀ v_i‖² = Σ_t weight_t ‖J_tᵀ unit_t‖² exactly (no cross terms; one backward pass per
    position that has a counted prediction)."""
    for t in torch.unique(pb.position).tolist():
        sel = pb.position == t
        rows = torch.zeros_like(unit)
        rows[sel] = unit[sel]
        w = torch.zeros(pb.n_samples, dtype=unit.dtype, device=unit.device)
        w[pb.sample[sel]] = torch.exp(log_weight[sel])
        yield w, pb.to_output(rows)


def row_terms(
    pb: Predictions, log_weight: torch.Tensor, unit: torch.Tensor, signs: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (w, v) with every counted row at once: v_t = ε_t √(weight_t / w_i) unit_t, w_i = max_t weight_t
    over sample i's rows (so that the largest row has unit scale: float32-safe when weights underflow).

    w_i ‖J_iᵀ v_i‖² = Σ_t weight_t ‖a_t‖² + Σ_{t≠t'} ε_t ε_t' √(weight_t weight_t') ⟨a_t, a_t'⟩, a_t = J_tᵀ unit_t:
    with ``signs`` (a generator) the ε_t are independent Rademacher signs, E[ε_t ε_t'] = δ_tt', and the cross
    terms vanish in expectation (theory/CURVATURE.md §8); without, ε = 1 (for one prediction per sample, or
    units that are zero-mean and independent across positions already)."""
    top = torch.full((pb.n_samples,), -torch.inf, dtype=log_weight.dtype, device=log_weight.device)
    top = top.scatter_reduce(0, pb.sample, log_weight, reduce="amax")
    rel = log_weight - top[pb.sample]
    scale = torch.where(torch.isfinite(rel), torch.exp(0.5 * rel), torch.zeros_like(rel))
    if signs is not None and pb.positions > 1:
        eps = (torch.randint(0, 2, (pb.count,), generator=signs) * 2 - 1).to(scale)
        scale = scale * eps
    return torch.exp(top), pb.to_output(unit * scale.unsqueeze(1))


def _per_sample_norms(model: nn.Module, params: dict, backend: str, output_fn: OutputFn | None) -> PerSampleNorms:
    if "output_fn" in inspect.signature(PerSampleNorms).parameters:
        return PerSampleNorms(model, params, backend, output_fn=output_fn)
    if output_fn not in (None, model_output):  # pragma: no cover - an engine without issue 15's interface
        raise GmixError("this version of the per-sample-norm engine takes no output_fn")
    return PerSampleNorms(model, params, backend)


def run_per_sample(
    model: nn.Module,
    data: Any,
    *,
    terms: TermFn,
    method: str,
    num_probes: int,
    generator: torch.Generator | int | None,
    target_rel_stderr: float | None,
    max_probes: int | None,
    bn_mode: str,
    batch_size: int | None,
    backend: str,
    progress: bool,
    exact: bool = False,
    quantity: str = "ggn_trace",
    finish: Callable[[dict, ProbeSums], dict] | None = None,
    budget: int | None = None,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
) -> CurvatureResult:
    """Estimate (1/n) Σ_probes-mean Σ_i Σ_terms w_i ‖J_iᵀ v_i‖² with the per-sample-norm engine (see ``_norms``
    and the module docstring), n the number of counted predictions."""
    start = time.perf_counter()
    check_bn_mode(bn_mode)
    check_probes(num_probes, target_rel_stderr, max_probes)
    loss_ = get_loss(loss)
    output_fn = resolve_output_fn(output_fn)
    if bn_mode == "train" and has_batchnorm(model):
        raise GmixError(
            f"method {method!r} needs independent per-sample terms: use bn_mode='eval' "
            "(BatchNorm running statistics), or method='hutchinson' for batch statistics"
        )
    gen = make_generator(generator)
    diag: dict[str, float] = {}
    passes = [0]
    with bn_mode_context(model, bn_mode):
        params = trainable(model)
        names = list(params)
        device, dtype = model_device_dtype(model)
        batches = as_batches(data, batch_size=batch_size, device=device, dtype=dtype)
        psn = _per_sample_norms(model, params, backend, output_fn)

        def recount() -> tuple[int, int]:
            return count_non_finite(model, batches, output_fn)

        def run_round(seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
            k = len(seeds)
            totals = torch.zeros(k, dtype=torch.float64, device=device)
            blocks = torch.zeros(k, len(names), dtype=torch.float64, device=device)
            per_sample: list[torch.Tensor] = []  # (k, N) per batch: the per-sample terms of each probe
            n = n_samples = 0
            for idx, x, y in _progress(batches, method, progress):
                pb = make_predictions(psn.forward(x), y, loss_, ignore_index, recount)
                n_samples += pb.n_samples
                if pb.count == 0:
                    continue
                n += pb.count
                zero = torch.zeros(pb.n_samples, dtype=pb.f.dtype, device=device)
                mine = torch.zeros(k, pb.n_samples, dtype=torch.float64, device=device)
                for j, seed in enumerate(seeds):
                    for w, v in terms(pb, batch_generator(seed, idx), diag):
                        norms = psn.norms(v)
                        passes[0] += 1
                        stacked = torch.stack([norms[name] if name in norms else zero for name in names])
                        weighted = (stacked * w).double()
                        blocks[j] += weighted.sum(1)
                        mine[j] += weighted.sum(0)
                per_sample.append(mine)
            totals = blocks.sum(1)
            n_all = int(all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)).item())
            s_all = int(all_reduce_sum(torch.tensor(float(n_samples), dtype=torch.float64)).item())
            if s_all == 0:
                raise GmixError("the data is empty: no samples to measure curvature on")
            if n_all == 0:
                raise GmixError(nothing_counted(loss_, ignore_index))
            per = torch.cat(per_sample, 1) if per_sample else torch.zeros(k, 0, dtype=torch.float64)
            return all_reduce_sum(totals).cpu(), all_reduce_sum(blocks).cpu(), n_all, s_all, per

        if exact:
            sums = ProbeSums(names)
            sums.add(*run_round([0]))
        else:
            sums = run_rounds(run_round, names, gen, num_probes, target_rel_stderr, max_probes or 10_000, budget)
    value, stderr = sums.value()
    per_param, per_param_se = sums.per_param()
    for key in list(diag):
        diag[key] = float(all_reduce_sum(torch.tensor(diag[key], dtype=torch.float64)).item())
    extra = {
        "backend": psn.backend, "loss": loss_.name, "n_predictions": sums.n, "backward_passes": passes[0],
        **(finish(diag, sums) if finish else {}),
    }  # fmt: skip
    if not exact:
        extra["probe_values"] = sums.probe_values()
        extra.update(sums.stderr_basis())
    if target_rel_stderr is not None:
        extra["target_rel_stderr"] = target_rel_stderr
    return CurvatureResult(
        value=value,
        stderr=None if exact else stderr,
        n_samples=sums.n_samples,
        n_probes=0 if exact else sums.k,
        method=method,
        bn_mode=bn_mode,
        seconds=time.perf_counter() - start,
        quantity=quantity,
        per_param=per_param,
        per_param_stderr={} if exact else per_param_se,
        extra=extra,
    )
