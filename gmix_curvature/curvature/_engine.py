"""The probe loop shared by the estimators built on per-sample norms, and the bookkeeping of every
stochastic estimate: per-probe sums over all samples (all-reduced over ranks), their mean and standard
error, adaptive stopping at a target relative standard error, reproducible per-(probe, batch) draws."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gmix_curvature.curvature._data import all_reduce_sum, as_batches, check_labels, world
from gmix_curvature.curvature._model import bn_mode_context, check_bn_mode, has_batchnorm, model_device_dtype, trainable
from gmix_curvature.curvature._norms import PerSampleNorms
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature._softmax import SoftmaxStats, softmax_stats
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
]

_GOLDEN = 0x9E3779B97F4A7C15
# A standard error estimated from fewer probe values is too unreliable to stop on: per-probe values of a
# confident model are heavy-tailed or discrete (one dominant sample), and 4 equal values happen.
MIN_PROBES_FOR_TARGET = 8
TermFn = Callable[[SoftmaxStats, torch.Tensor, torch.Generator, dict], list[tuple[torch.Tensor, torch.Tensor]]]


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
    """Per-probe sums over samples of a stochastic estimate (total and per parameter)."""

    names: list[str]
    totals: list[float] = field(default_factory=list)
    blocks: list[list[float]] = field(default_factory=list)
    n: int = 0

    def add(self, totals: torch.Tensor, blocks: torch.Tensor, n: int) -> None:
        self.totals += [float(t) for t in totals]
        self.blocks += blocks.tolist()
        self.n = n

    @property
    def k(self) -> int:
        return len(self.totals)

    def value(self) -> tuple[float, float | None]:
        t = torch.tensor(self.totals, dtype=torch.float64) / self.n
        se = float(t.std() / math.sqrt(self.k)) if self.k >= 2 else None
        return float(t.mean()), se

    def probe_values(self) -> list[float]:
        """The estimate of each probe alone (its sum over samples / n)."""
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
    error reaches it (or ``max_probes`` ran). ``run_round(seeds)`` returns all-reduced per-probe sums.
    With ``budget``, raise :class:`OverBudget` as soon as the target is predicted to need more probes."""
    sums = ProbeSums(names)
    todo = max(num_probes, MIN_PROBES_FOR_TARGET) if target_rel_stderr is not None else num_probes
    while todo > 0:
        totals, blocks, n = run_round(probe_seeds(gen, todo))
        sums.add(totals, blocks, n)
        todo = sums.needed(target_rel_stderr, max_probes) if target_rel_stderr is not None else 0
        if budget is not None and sums.k + todo > budget:
            raise OverBudget(sums)
    return sums


class OverBudget(Exception):
    """The target relative standard error would need more probes than the budget (see ``method="auto"``)."""

    def __init__(self, sums: ProbeSums) -> None:
        super().__init__("over budget")
        self.sums = sums


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
) -> CurvatureResult:
    """Estimate (1/n) Σ_i Σ_terms w_i ‖J_iᵀ v_i‖² with the per-sample-norm engine (see ``_norms``)."""
    start = time.perf_counter()
    check_bn_mode(bn_mode)
    check_probes(num_probes, target_rel_stderr, max_probes)
    if bn_mode == "train" and has_batchnorm(model):
        raise GmixError(
            f"method {method!r} needs independent per-sample terms: use bn_mode='eval' "
            "(BatchNorm running statistics), or method='hutchinson' for batch statistics"
        )
    gen = make_generator(generator)
    diag: dict[str, float] = {}
    with bn_mode_context(model, bn_mode):
        params = trainable(model)
        names = list(params)
        device, dtype = model_device_dtype(model)
        batches = as_batches(data, batch_size=batch_size, device=device, dtype=dtype)
        psn = PerSampleNorms(model, params, backend)

        def run_round(seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
            k = len(seeds)
            totals = torch.zeros(k, dtype=torch.float64, device=device)
            blocks = torch.zeros(k, len(names), dtype=torch.float64, device=device)
            n = 0
            for idx, x, y in _progress(batches, method, progress):
                logits = psn.forward(x)
                if logits.ndim != 2 or logits.shape[1] < 2:
                    raise GmixError(f"the model must output (batch, classes) logits, got shape {tuple(logits.shape)}")
                check_labels(y, logits.shape[1])
                stats = softmax_stats(logits)
                n += int(y.shape[0])
                zero = torch.zeros_like(stats.p[:, 0])
                for j, seed in enumerate(seeds):
                    for w, v in terms(stats, y, batch_generator(seed, idx), diag):
                        norms = psn.norms(v)
                        stacked = torch.stack([norms[name] if name in norms else zero for name in names])
                        blocks[j] += (stacked * w).sum(1, dtype=torch.float64)
            totals = blocks.sum(1)
            n_all = int(all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)).item())
            if n_all == 0:
                raise GmixError("the data is empty: no samples to measure curvature on")
            return all_reduce_sum(totals).cpu(), all_reduce_sum(blocks).cpu(), n_all

        if exact:
            totals, blocks, n = run_round([0])
            sums = ProbeSums(names)
            sums.add(totals, blocks, n)
        else:
            sums = run_rounds(run_round, names, gen, num_probes, target_rel_stderr, max_probes or 10_000, budget)
    value, stderr = sums.value()
    per_param, per_param_se = sums.per_param()
    for key in list(diag):
        diag[key] = float(all_reduce_sum(torch.tensor(diag[key], dtype=torch.float64)).item())
    extra = {"backend": psn.backend, **(finish(diag, sums) if finish else {})}
    if not exact:
        extra["probe_values"] = sums.probe_values()
    if target_rel_stderr is not None:
        extra["target_rel_stderr"] = target_rel_stderr
    return CurvatureResult(
        value=value,
        stderr=None if exact else stderr,
        n_samples=sums.n,
        n_probes=0 if exact else sums.k,
        method=method,
        bn_mode=bn_mode,
        seconds=time.perf_counter() - start,
        quantity=quantity,
        per_param=per_param,
        per_param_stderr={} if exact else per_param_se,
        extra=extra,
    )
