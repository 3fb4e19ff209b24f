"""Table 1 of the paper (Section 2.2): the curvature Tr(G(θ)) (Eq. 5) of what large-batch SGD finds, with
and without GradientMix (Eq. 4), measured with uncertainty — and what could explain a difference (issue 10).

One call, :func:`run_table1`, runs the whole pipeline of a :class:`Table1Preset`:

1. **κ** (Eq. 12): given, or chosen per noise kind by :func:`select_kappa` — a small sweep of r = κ·B trained on
   the ``fit`` split and scored on ``val``, never on ``test`` (the rule: the highest mean validation accuracy,
   ties to the lower validation loss, then to the smaller r);
2. **training**: the averaging baseline (``noise="none"``), Gaussian and Rademacher GradientMix at the same
   large batch with identical hyperparameters, and a small-batch reference, ``seeds`` runs each, through
   :func:`gmix_curvature.train.train` (each keeps its checkpoint, so ``gmix trace`` can re-measure it, and
   records Tr(G) and the training loss along training in ``metrics.jsonl``, kind ``"trace"``);
3. **measurement** (:func:`measure_run`, the model in eval mode): on the measure split (the test split) the
   accuracy, exact Tr(G) and |log Tr(G)|, the empirical-Fisher trace, the Hessian trace (Hutchinson) and the
   scale-invariant sharpness Σ_l ‖θ_l‖² Tr(G_ll); on the training split the training loss and the top
   eigenvalues λ_max of G and of the Hessian, beside the optimizer's stability threshold
   (:func:`stability_threshold`) at the peak and at the final learning rate; along training, Tr(G) at one
   training loss that every run reached (:func:`matched_loss_trace`) and the largest ratio of λ_max(G) to the
   threshold at that step's learning rate;
4. **summary** (:func:`summarise`): mean ± std over seeds and Welch's t-test against the baseline for every
   quantity, printed in the paper's layout beside the paper's numbers (:meth:`Table1Result.format_table`),
   written as JSON, CSV and two seaborn figures (:func:`write_table1`).

Presets (:data:`TABLE1_PRESETS`): ``tiny`` (the embedded digits, minutes on a laptop CPU; theory/TABLE1.md says
how it was chosen), ``paper`` (ResNet-18, CIFAR-10, batch 8192, Section 5.1) and ``micro`` (seconds, for tests).
Under ``torchrun`` every rank trains and measures (the estimators shard the data and all-reduce); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from gmix_curvature.data import load_dataset
from gmix_curvature.distributed import init_distributed
from gmix_curvature.errors import GmixError, TrainingDiverged
from gmix_curvature.optim import schedule_from_config
from gmix_curvature.optim.config import peak_lr
from gmix_curvature.train import TrainConfig, evaluate, resolve_config, train

__all__ = [
    "Table1Method",
    "Table1Preset",
    "TABLE1_METHODS",
    "TABLE1_PRESETS",
    "TABLE1_METRICS",
    "PAPER_TABLE1",
    "table1_preset",
    "stability_threshold",
    "welch_p_value",
    "select_kappa",
    "KappaSelection",
    "measure_run",
    "matched_loss_trace",
    "summarise",
    "run_table1",
    "RunRecord",
    "Table1Row",
    "Table1Samples",
    "Table1Result",
    "table1_data",
    "write_table1",
    "plot_table1",
    "plot_trace_vs_loss",
]

# |log Tr(G(θ))| of Table 1 (ResNet-18, CIFAR-10, batch 8K); the paper gives nothing else for this table.
PAPER_TABLE1: Mapping[str, float] = MappingProxyType({"baseline": 5.87, "gaussian": 4.21, "rademacher": 4.58})


@dataclass(frozen=True)
class Table1Method:
    """A row of Table 1: a noise kind (Eq. 12; ``"none"`` is the averaging baseline) at the large batch, or
    the small-batch reference (``small_batch=True``)."""

    key: str
    label: str
    noise: str
    small_batch: bool = False


TABLE1_METHODS: tuple[Table1Method, ...] = (
    Table1Method("small_batch", "SGD, small batch (reference)", "none", small_batch=True),
    Table1Method("baseline", "SGD Baseline", "none"),
    Table1Method("gaussian", "SGD + GradientMix (Gaussian)", "gaussian"),
    Table1Method("rademacher", "SGD + GradientMix (Rademacher)", "rademacher"),
)
_METHOD = {m.key: m for m in TABLE1_METHODS}


@dataclass(frozen=True)
class Table1Preset:
    """Everything a Table 1 run depends on besides the seeds and κ.

    ``train`` holds the :class:`~gmix_curvature.train.TrainConfig` fields shared by every run (the same
    optimizer, linear-scaling LR, warmup and epochs for every row); ``batch_size`` is the large batch of the
    compared rows and ``small_batch_size`` the reference row's (None: no reference row). ``kappa_ratio`` is
    r = κ·B used when ``kappa_sweep`` is empty and none is given; with a sweep, :func:`select_kappa` scores
    each candidate r on ``select_splits`` = (train on, score on). Curvature is measured on ``measure_split``
    (``measure_samples`` of it, None: all); the training loss on the whole training split, λ_max on
    ``eigen_samples`` of it (0: not measured); the Hessian trace with ``hessian_probes`` Rademacher probes
    (0: not measured); in ``measure_dtype``. Along training, ``trace_points`` records per run on
    ``trace_samples`` training images (0: none). ``methods`` names the rows run (keys of
    :data:`TABLE1_METHODS`). ``threads`` pins torch's intra-op CPU threads for the whole run (restored
    after; None: torch's default): float reductions are summed in an order that depends on the thread count,
    and a 60-epoch run amplifies the last bit into a different network, so only a pinned count makes the
    table a function of the preset, the seeds and the machine.
    """

    name: str
    description: str
    train: Mapping[str, Any]
    batch_size: int
    small_batch_size: int | None
    seeds: int
    kappa_ratio: float
    kappa_sweep: tuple[float, ...] = ()
    select_splits: tuple[str, str] = ("fit", "val")
    select_seeds: int = 1
    measure_split: str = "test"
    measure_samples: int | None = None
    eigen_samples: int | None = None
    measure_batch_size: int | None = None
    hessian_probes: int = 32
    eig_tol: float = 1e-4
    measure_dtype: str = "float64"
    trace_points: int = 12
    trace_samples: int = 256
    needs_data_dir: bool = False
    methods: tuple[str, ...] = ("small_batch", "baseline", "gaussian", "rademacher")
    threads: int | None = None
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["train"] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in self.train.items()}
        d["kappa_sweep"], d["select_splits"] = list(self.kappa_sweep), list(self.select_splits)
        return d


_TINY_TRAIN = MappingProxyType(
    {
        "model": "digits_cnn",
        "data": "digits",
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": 0.1,
        "lr_scaling": "linear",
        "base_batch": 200,
        "weight_decay": 5e-4,
        "schedule": "poly",
        "p_warmup": 1.0,
        "p_decay": 2.0,
        "lr_final": 0.0,
        "epochs": 60,
        "warmup_epochs": 6,
        "train_split": "train",
        "eval_split": "test",
    }
)

TABLE1_PRESETS: Mapping[str, Table1Preset] = MappingProxyType(
    {
        "tiny": Table1Preset(
            name="tiny",
            description="digits CNN on the embedded digits (1,437 train images), batch 512 vs 32, 3 seeds, 60 epochs",
            train=_TINY_TRAIN,
            batch_size=512,
            small_batch_size=32,
            seeds=3,
            kappa_ratio=1.0,
            kappa_sweep=(0.5, 1.0, 2.0, 4.0),
            select_splits=("fit", "val"),
            select_seeds=2,
            eigen_samples=512,
            hessian_probes=64,
            measure_dtype="float32",
            trace_points=12,
            trace_samples=256,
            threads=1,
            notes="batch 512 is 36 % of the training set per step (8192 is 16 % of CIFAR-10's); one CPU thread, so "
            "that the table does not depend on the machine's core count; see theory/TABLE1.md",
        ),
        "paper": Table1Preset(
            name="paper",
            description="ResNet-18 on CIFAR-10 (--data-dir), batch 8192 vs 200, SGD momentum 0.9, 200 epochs (§5.1)",
            # the same optimizer and schedule as tiny (Section 5.1), on ResNet-18/CIFAR-10 for 200 epochs
            train=MappingProxyType(
                {
                    **_TINY_TRAIN,
                    "model": "resnet18",
                    "data": "cifar10",
                    "epochs": 200,
                    "warmup_epochs": 20,
                    "micro_batch_size": 1024,
                }
            ),
            batch_size=8192,
            small_batch_size=200,
            seeds=3,
            kappa_ratio=1.0,
            measure_batch_size=500,
            eigen_samples=5000,
            hessian_probes=32,
            eig_tol=1e-3,
            measure_dtype="float32",
            trace_points=20,
            trace_samples=1000,
            needs_data_dir=True,
            notes=(
                "Section 5.1: linear scaling 0.1 per 200 samples, 200 epochs with 20 of warmup, poly schedule "
                "(Eq. 15); "
                "not in the paper, so chosen here as in the fig1_sgd_lars preset: p_warmup 1, p_decay 2, final LR 0, "
                "weight decay 5e-4, r = kappa*B = 1 (the paper gives no kappa for Table 1), micro-batches of 1024"
            ),
        ),
        "micro": Table1Preset(
            name="micro",
            description="seconds-long end-to-end check: digits CNN of width 4, a few steps, 2 seeds",
            train=MappingProxyType({**_TINY_TRAIN, "model_kwargs": {"width": 4}, "epochs": None, "steps": 4,
                                    "warmup_epochs": 0.0, "warmup_steps": 1}),
            batch_size=64,
            small_batch_size=16,
            seeds=2,
            kappa_ratio=1.0,
            kappa_sweep=(1.0, 2.0),
            select_seeds=1,
            measure_samples=48,
            eigen_samples=48,
            hessian_probes=4,
            eig_tol=1e-3,
            measure_dtype="float32",
            trace_points=1,
            trace_samples=32,
            threads=1,
        ),
    }
)


def table1_preset(name: str | Table1Preset) -> Table1Preset:
    """The Table 1 preset ``name`` (a preset passes through); an unknown name raises ValueError listing them.

    >>> table1_preset("tiny").batch_size
    512
    >>> table1_preset("huge")
    Traceback (most recent call last):
    ...
    ValueError: unknown Table 1 preset 'huge'; valid: tiny, paper, micro
    """
    if not isinstance(name, Table1Preset):
        if name not in TABLE1_PRESETS:
            raise ValueError(f"unknown Table 1 preset {name!r}; valid: {', '.join(TABLE1_PRESETS)}")
        name = TABLE1_PRESETS[name]
    unknown = [m for m in name.methods if m not in _METHOD]
    if unknown or not name.methods:
        raise ValueError(f"unknown Table 1 methods {unknown or '()'}; valid: {', '.join(_METHOD)}")
    return name


# ----------------------------------------------------------------------------------------------- statistics


def stability_threshold(optimizer: str, lr: float, momentum: float) -> float:
    """The largest curvature λ at which the optimizer is stable on the quadratic ½λθ² at learning rate η.

    Heavy-ball momentum (``sgd``: v ← μv + g, θ ← θ − ηv) is stable iff ηλ < 2(1+μ); Nesterov's
    (``nesterov``) iff ηλ < 2(1+μ)/(1+2μ) — the "edge of stability" thresholds of Cohen et al. (2021,
    Appendix). Adaptive and layer-wise optimizers (adam, adamw, lars, lamb) precondition the step, so their
    threshold concerns the preconditioned Hessian and is not given here: NaN. Weight decay λ_wd adds
    λ_wd to the curvature of decayed weights (negligible at 5·10⁻⁴). A zero learning rate gives inf.

    >>> round(stability_threshold("sgd", 0.1, 0.9), 12)  # 2·1.9/0.1
    38.0
    >>> round(stability_threshold("nesterov", 0.1, 0.9), 4)
    13.5714
    >>> stability_threshold("lamb", 0.1, 0.9)
    nan
    """
    if lr < 0 or not 0 <= momentum < 1:
        raise GmixError(f"need lr >= 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
    if optimizer == "sgd":
        factor = 2 * (1 + momentum)
    elif optimizer == "nesterov":
        factor = 2 * (1 + momentum) / (1 + 2 * momentum)
    else:
        return math.nan
    return math.inf if lr == 0 else factor / lr


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) of the means of ``a`` and ``b``; NaN with fewer
    than two finite values in either, or when both have zero spread.

    >>> round(welch_p_value([1.0, 2.0, 3.0], [4.0, 5.0, 6.5]), 4)  # t = -3.41 on 3.8 degrees of freedom
    0.0291
    >>> welch_p_value([1.0], [2.0, 3.0])
    nan
    """
    from scipy import stats

    a = np.asarray([v for v in a if math.isfinite(v)], dtype=np.float64)
    b = np.asarray([v for v in b if math.isfinite(v)], dtype=np.float64)
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
    return mean, std, len(v)


# ------------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class _Metric:
    key: str
    header: str
    fmt: str
    where: str
    doc: str


TABLE1_METRICS: tuple[_Metric, ...] = (
    _Metric("test_acc", "test acc. (%)", "{:.2f}", "measure", "accuracy on the measure split, eval mode, in %"),
    _Metric("test_loss", "test loss", "{:.4f}", "measure", "mean cross-entropy on the measure split"),
    _Metric("abs_log_ggn_trace", "|log Tr(G)|", "{:.2f}", "measure", "|ln Tr(G)|, the quantity of Table 1"),
    _Metric("log_ggn_trace", "log Tr(G)", "{:.2f}", "measure", "ln Tr(G), signed"),
    _Metric("ggn_trace", "Tr(G)", "{:.3g}", "measure", "exact Tr(G), Eq. 5, mean over samples"),
    _Metric("ef_trace", "Tr(EF)", "{:.3g}", "measure", "empirical-Fisher trace (1/n)Σ‖∇ℓ_i‖² (Eq. 10 / n)"),
    _Metric("hessian_trace", "Tr(H)", "{:.3g}", "measure", "Hessian trace of the mean loss, Hutchinson"),
    _Metric("si_sharpness", "SI sharpness", "{:.3g}", "measure", "Σ_l ‖θ_l‖² Tr(G_ll) over scale-invariant groups"),
    _Metric("si_weight_norm2", "‖θ_SI‖²", "{:.3g}", "measure", "Σ_l ‖θ_l‖² over the same groups"),
    _Metric("train_loss", "train loss", "{:.3g}", "train", "mean cross-entropy on the training split, eval mode"),
    _Metric("train_acc", "train acc. (%)", "{:.2f}", "train", "accuracy on the training split, eval mode, in %"),
    _Metric("lambda_max_ggn", "λmax(G)", "{:.3g}", "train", "top eigenvalue of G, Lanczos"),
    _Metric("lambda_max_hessian", "λmax(H)", "{:.3g}", "train", "top eigenvalue of the Hessian, Lanczos"),
    _Metric("lr_peak", "η peak", "{:.3g}", "config", "peak learning rate (linear scaling)"),
    _Metric("lr_final", "η final", "{:.3g}", "config", "learning rate of the last optimizer step"),
    _Metric("threshold_peak", "2(1+μ)/η peak", "{:.3g}", "config", "stability threshold at the peak LR"),
    _Metric("threshold_final", "2(1+μ)/η final", "{:.3g}", "config", "stability threshold at the final LR"),
    _Metric("edge_ratio_max", "max λmax/thr", "{:.3g}", "trace",
            "largest λ_max(G)/threshold(η_t) along training (eval mode); 1 = edge of stability"),
    _Metric("ggn_trace_matched", "Tr(G) @ L*", "{:.3g}", "trace", "Tr(G) along training at the matched loss L*"),
)
_METRIC = {m.key: m for m in TABLE1_METRICS}


# ------------------------------------------------------------------------------------------------- records


@dataclass
class RunRecord:
    """One trained run: its row (``method``), seed, batch, κ, where its checkpoint lies, what was measured
    (``metrics``, keys of :data:`TABLE1_METRICS`) and its along-training records (``trace``)."""

    method: str
    seed: int
    batch_size: int
    noise: str
    kappa_ratio: float
    kappa: float
    steps: int
    out: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    trace: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Table1Row:
    """One method's summary: per metric (mean, std, n, Welch p-value against the baseline), the paper's
    |log Tr(G)| where it has one."""

    method: str
    label: str
    batch_size: int
    kappa_ratio: float
    n: int
    stats: dict[str, dict[str, float]]
    paper: float | None

    def cell(self, key: str, *, p: bool = False) -> str:
        s = self.stats.get(key)
        if s is None or not math.isfinite(s["mean"]):
            return "—"
        fmt = _METRIC[key].fmt
        text = fmt.format(s["mean"])
        if math.isfinite(s["std"]) and s["std"] > 1e-9 * abs(s["mean"]):
            text += " ± " + fmt.format(s["std"])
        if p and math.isfinite(s.get("p_value", math.nan)):
            text += f" (p={s['p_value']:.2g})"
        return text


@dataclass
class KappaSelection:
    """The κ sweep of :func:`select_kappa`: every (noise, r, seed) scored on the validation split, the rule
    and the chosen r per noise kind (``baseline`` holds the averaging runs' scores, for reference)."""

    rule: str
    splits: tuple[str, str]
    batch_size: int
    candidates: tuple[float, ...]
    scores: list[dict[str, Any]]
    chosen: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        lines = [
            f"κ selection: train on {self.splits[0]!r}, score on {self.splits[1]!r} (batch {self.batch_size}); "
            f"rule: {self.rule}",
            "| noise | r = κ·B | val acc. (%) | val loss | chosen |",
            "|---|---|---|---|---|",
        ]
        groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for s in self.scores:
            groups.setdefault((s["noise"], s["kappa_ratio"]), []).append(s)
        for (noise, r), rows in groups.items():
            acc = _mean_std([100 * x["val_acc"] for x in rows])[0]
            loss = _mean_std([x["val_loss"] for x in rows])[0]
            mark = "✓" if self.chosen.get(noise) == r else ""
            lines.append(f"| {noise} | {r:g} | {acc:.2f} | {loss:.4f} | {mark} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class Table1Samples:
    """Which samples of a split a Table 1 quantity was measured on: ``split`` of data set ``data``, and when a
    subset, its ``indices`` into the split — the first ``len(indices)`` of ``torch.randperm`` with a generator
    seeded with ``seed``, as :meth:`~gmix_curvature.data.ArrayDataset.subset` draws them; None: the whole split.

    >>> s = Table1Samples("digits", "test", 0, (3, 1, 4))
    >>> len(s.load()), s.load().y.tolist() == load_dataset("digits", "test").y[[3, 1, 4]].tolist()
    (3, True)
    """

    data: str
    split: str
    seed: int
    indices: tuple[int, ...] | None

    @classmethod
    def draw(cls, data: str, split: str, size: int, n: int | None, seed: int) -> Table1Samples:
        """The selection of ``n`` of a split of ``size`` samples (all of it when ``n`` is None or ≥ ``size``)."""
        if n is None or n >= size:
            return cls(data, split, seed, None)
        return cls(data, split, seed, tuple(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
                                            .tolist()))

    def select(self, ds: Any) -> Any:
        """These samples of ``ds``, the loaded split (an :class:`~gmix_curvature.data.ArrayDataset`)."""
        if self.indices is None:
            return ds
        if self.indices and max(self.indices) >= len(ds):
            raise GmixError(f"{self.data}/{self.split} has {len(ds)} samples, but the table measured index "
                            f"{max(self.indices)}: not the split the table was run on")
        idx = torch.tensor(self.indices, dtype=torch.long)
        return dataclasses.replace(ds, x=ds.x[idx], y=ds.y[idx])

    def load(self, data_dir: str | None = None) -> Any:
        """Load the split (``data_dir`` for CIFAR) and return these samples of it."""
        return self.select(load_dataset(self.data, self.split, data_dir))

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "split": self.split, "seed": self.seed,
                "indices": None if self.indices is None else list(self.indices)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Table1Samples:
        idx = d.get("indices")
        return cls(str(d["data"]), str(d["split"]), int(d["seed"]), None if idx is None else tuple(int(i) for i in idx))


@dataclass
class Table1Result:
    """What :func:`run_table1` produced: the preset, κ (r per noise kind, and the sweep if one ran), every run,
    the summary rows, the matched training loss L*, where the outputs are, and which samples were measured:
    ``samples["measure"]`` (the curvature columns) and ``samples["eigen"]`` (λ_max), as :class:`Table1Samples`
    — :meth:`measure_data` and :meth:`eigen_data` load them back (``data_dir``: where the run found CIFAR)."""

    preset: Table1Preset
    kappa_ratios: dict[str, float]
    selection: KappaSelection | None
    runs: list[RunRecord]
    rows: list[Table1Row]
    matched_loss: float | None
    momentum: float
    optimizer: str
    out: Path | None = None
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    samples: dict[str, Table1Samples] = field(default_factory=dict)
    data_dir: str | None = None

    def measure_data(self, data_dir: str | None = None) -> Any:
        """The samples the curvature columns were measured on (Tr(G), EF, Hessian, SI sharpness, accuracy), as a
        data set: the same inputs and labels, in the same order. ``data_dir`` defaults to the run's."""
        return table1_data(self, "measure", data_dir=data_dir)

    def eigen_data(self, data_dir: str | None = None) -> Any:
        """The training samples λ_max of G and of the Hessian were measured on, as :meth:`measure_data`."""
        return table1_data(self, "eigen", data_dir=data_dir)

    def row(self, method: str) -> Table1Row:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset.to_dict(),
            "kappa_ratios": self.kappa_ratios,
            "selection": self.selection.to_dict() if self.selection else None,
            "matched_loss": self.matched_loss,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "paper": dict(PAPER_TABLE1),
            "metrics": {m.key: {"header": m.header, "where": m.where, "doc": m.doc} for m in TABLE1_METRICS},
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "runs": [r.to_dict() for r in self.runs],
            "seconds": self.seconds,
            "files": self.files,
            "samples": {k: v.to_dict() for k, v in self.samples.items()},
            "data_dir": self.data_dir,
        }

    def format_table(self) -> str:
        """The tables as Markdown: Table 1 in the paper's layout (plus accuracy and p-values), the curvature
        details and the stability check."""
        p = self.preset
        mu = self.momentum
        thr = "2(1+μ)/η" if self.optimizer == "sgd" else "threshold"
        n = max((r.n for r in self.rows), default=0)
        head = [
            f"Table 1, preset {p.name!r}: {p.description}.",
            f"Mean ± std over {n} seeds; p: Welch's t-test against the SGD Baseline. Curvature on the "
            f"{p.measure_split!r} split in eval mode; Tr = mean over samples (Eq. 5); log = natural log.",
            "",
            "| Method | batch | r = κ·B | test acc. (%) | \\|log Tr(G)\\| | log Tr(G) | paper's \\|log Tr(G)\\| |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            paper = f"{r.paper:.2f} (paper)" if r.paper is not None else "—"
            head.append(
                f"| {r.label} | {r.batch_size} | {r.kappa_ratio:g} | {r.cell('test_acc', p=True)} "
                f"| {r.cell('abs_log_ggn_trace', p=True)} | {r.cell('log_ggn_trace')} | {paper} |"
            )
        head += [
            "",
            "Curvature (measure split): Tr(G) exact, empirical Fisher, Hessian (Hutchinson, "
            f"{p.hessian_probes} probes), scale-invariant sharpness Σ‖θ_l‖²Tr(G_ll); Tr(G) @ L*: along training, "
            f"on {p.trace_samples} training images, where the training loss first reached L* = "
            + (f"{self.matched_loss:.4g}" if self.matched_loss is not None else "—")
            + " (the lowest loss every run reached).",
            "",
            "| Method | Tr(G) | Tr(EF) | Tr(H) | SI sharpness | ‖θ_SI‖² | Tr(G) @ L* |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            head.append(
                f"| {r.label} | {r.cell('ggn_trace', p=True)} | {r.cell('ef_trace', p=True)} "
                f"| {r.cell('hessian_trace', p=True)} | {r.cell('si_sharpness', p=True)} "
                f"| {r.cell('si_weight_norm2')} | {r.cell('ggn_trace_matched', p=True)} |"
            )
        head += [
            "",
            f"Stability (training split, eval mode): λ_max of G and of the Hessian at the end against the threshold "
            f"{thr} (μ = {mu:g}; stability_threshold) at the peak and at the final learning rate of the schedule; "
            "last column: the largest λ_max(G)/threshold(η_t) along training, η_t the rate of that step "
            "(1 = the edge of stability; BatchNorm in eval mode, so not exactly the sharpness a train-mode step sees).",
            "",
            f"| Method | train loss | λmax(G) | λmax(H) | η peak | {thr} at η peak | η final | {thr} at η final "
            "| max along training of λmax(G)/threshold(η_t) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            head.append(
                f"| {r.label} | {r.cell('train_loss', p=True)} | {r.cell('lambda_max_ggn', p=True)} "
                f"| {r.cell('lambda_max_hessian', p=True)} | {r.cell('lr_peak')} | {r.cell('threshold_peak')} "
                f"| {r.cell('lr_final')} | {r.cell('threshold_final')} | {r.cell('edge_ratio_max', p=True)} |"
            )
        return "\n".join(head)


# --------------------------------------------------------------------------------------------- measurement


def table1_data(
    source: Table1Result | Mapping[str, Any] | str | Path, which: str = "measure", *, data_dir: str | None = None
) -> Any:
    """The samples a Table 1 run measured, loaded again: ``which`` = ``"measure"`` (the curvature columns, on the
    preset's measure split) or ``"eigen"`` (λ_max, on the training split). ``source`` is a :class:`Table1Result`,
    the dict of its ``table1.json``, or that file's path; ``data_dir`` defaults to the run's.

    >>> saved = {"samples": {"measure": {"data": "digits", "split": "test", "seed": 0, "indices": [5, 2]}}}
    >>> ds = table1_data(saved)
    >>> len(ds), ds.y.tolist() == load_dataset("digits", "test").y[[5, 2]].tolist()
    (2, True)
    """
    if isinstance(source, Table1Result):
        samples, run_dir = source.samples, source.data_dir
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (expected a table1.json written by gmix table1)")
            source = json.loads(path.read_text())
        if not isinstance(source.get("samples"), Mapping):
            raise GmixError("this Table 1 record has no 'samples': it was written before the measured samples were "
                            "recorded; run gmix table1 again (finished runs are reused)")
        samples = {k: Table1Samples.from_dict(v) for k, v in source["samples"].items()}
        run_dir = source.get("data_dir")
    if which not in samples:
        raise GmixError(f"unknown samples {which!r}; valid: {', '.join(samples) or 'none recorded'}")
    return samples[which].load(data_dir if data_dir is not None else run_dir)


def measure_run(
    model: nn.Module,
    config: TrainConfig,
    *,
    measure_data: Any,
    train_data: Any,
    eigen_data: Any,
    hessian_probes: int = 32,
    eig_tol: float = 1e-4,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    generator_seed: int = 0,
    eigen: bool = True,
) -> dict[str, float]:
    """The measured columns of one trained ``model`` (left unchanged; a copy in ``dtype`` is measured in eval
    mode): on ``measure_data`` accuracy and loss, exact Tr(G) (Eq. 5) and its logs, the empirical-Fisher and
    Hessian traces, the scale-invariant sharpness; on ``train_data`` the training loss; on ``eigen_data``
    λ_max of G and of the Hessian (NaN when ``eigen`` is False, or the Hessian trace when ``hessian_probes``
    is 0); from the resolved ``config`` the peak and final learning rates and the
    stability thresholds (:func:`stability_threshold`). Data are data sets (``.tensors()``).

    >>> from gmix_curvature.models import build_model
    >>> ds = load_dataset("digits", "test").subset(32)
    >>> net = build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8), width=4).eval()
    >>> cfg = resolve_config(TrainConfig(steps=10, batch_size=64), 100)
    >>> m = measure_run(net, cfg, measure_data=ds, train_data=ds, eigen_data=ds, hessian_probes=2, eigen=False)
    >>> round(m["threshold_peak"], 12), abs(m["abs_log_ggn_trace"] - abs(math.log(m["ggn_trace"]))) < 1e-12
    (38.0, True)
    """
    from gmix_curvature.curvature import (
        empirical_fisher_trace,
        ggn_trace,
        hessian_trace,
        scale_invariant_sharpness,
        top_eigenvalues,
    )

    device = next(model.parameters()).device
    net = _copy_model(model).to(dtype=dtype).eval()
    kw = {"batch_size": batch_size}

    def pair(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ds.tensors()
        return x.to(device=device, dtype=dtype), y.to(device)

    m: dict[str, float] = {}
    ev = evaluate(net, measure_data, device=device, dtype=dtype)
    m["test_acc"], m["test_loss"] = 100 * ev["acc"], ev["loss"]
    data = pair(measure_data)
    try:
        si = scale_invariant_sharpness(net, data, method="exact", **kw)
        m["ggn_trace"] = float(si.extra["ggn_trace"])
        m["si_sharpness"] = float(si.value)
        m["si_weight_norm2"] = float(sum(si.extra["weight_norms2"].values()))
    except GmixError as exc:
        if "scale-invariant" not in str(exc):
            raise
        m["ggn_trace"] = float(ggn_trace(net, data, "exact", **kw).value)
        m["si_sharpness"] = m["si_weight_norm2"] = math.nan
    m["log_ggn_trace"] = math.log(m["ggn_trace"]) if m["ggn_trace"] > 0 else math.nan
    m["abs_log_ggn_trace"] = abs(m["log_ggn_trace"])
    m["ef_trace"] = float(empirical_fisher_trace(net, data, **kw).value)
    m["hessian_trace"] = m["hessian_trace_stderr"] = math.nan
    if hessian_probes > 0:
        h = hessian_trace(net, data, num_probes=hessian_probes, generator=generator_seed, **kw)
        m["hessian_trace"], m["hessian_trace_stderr"] = float(h.value), float(h.stderr or math.nan)
    ev = evaluate(net, train_data, device=device, dtype=dtype)
    m["train_loss"], m["train_acc"] = ev["loss"], 100 * ev["acc"]
    for matrix in ("ggn", "hessian"):
        m[f"lambda_max_{matrix}"] = math.nan
        if eigen:
            r = top_eigenvalues(net, pair(eigen_data), 1, matrix=matrix, tol=eig_tol, generator=generator_seed, **kw)
            m[f"lambda_max_{matrix}"] = float(r.value)
    lr_fn = schedule_from_config(config, int(config.steps))
    m["lr_peak"] = float(peak_lr(config))
    m["lr_final"] = float(lr_fn(int(config.steps) - 1))
    m["threshold_peak"] = stability_threshold(config.optimizer, m["lr_peak"], config.momentum)
    m["threshold_final"] = stability_threshold(config.optimizer, m["lr_final"], config.momentum)
    return m


def _copy_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def matched_loss_trace(traces: Mapping[Any, Sequence[Mapping[str, float]]]) -> tuple[float | None, dict[Any, float]]:
    """Tr(G) of every run at one training loss L* that all of them reached: L* is the largest of the runs'
    lowest recorded losses, and each run's Tr(G) is read where its loss first fell to L*, interpolating
    log Tr(G) linearly in log loss between the two records around the crossing. ``traces`` maps a run to
    its records (``loss`` and ``ggn_trace``, in training order). Returns (L*, {run: Tr(G) at L*}).

    >>> t = {"a": [{"loss": 2.0, "ggn_trace": 1.0}, {"loss": 0.5, "ggn_trace": 4.0}],
    ...      "b": [{"loss": 2.0, "ggn_trace": 2.0}, {"loss": 1.0, "ggn_trace": 8.0}]}
    >>> level, at = matched_loss_trace(t)
    >>> level, round(at["a"], 12), round(at["b"], 12)
    (1.0, 2.0, 8.0)
    """
    clean = {
        k: [(float(r["loss"]), float(r["ggn_trace"])) for r in recs
            if math.isfinite(r.get("loss", math.nan)) and r.get("ggn_trace", math.nan) > 0 and r["loss"] > 0]
        for k, recs in traces.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return None, {}
    level = max(min(loss for loss, _ in v) for v in clean.values())
    out: dict[Any, float] = {}
    for k, recs in clean.items():
        prev = None
        for loss, tr in recs:
            if loss <= level:
                if prev is None or prev[0] <= loss:
                    out[k] = tr
                else:
                    w = (math.log(prev[0]) - math.log(level)) / (math.log(prev[0]) - math.log(loss))
                    out[k] = math.exp((1 - w) * math.log(prev[1]) + w * math.log(tr))
                break
            prev = (loss, tr)
    return level, out


def summarise(runs: Sequence[RunRecord], kappa_ratios: Mapping[str, float]) -> list[Table1Row]:
    """One :class:`Table1Row` per method present in ``runs``, in the order of :data:`TABLE1_METHODS`:
    mean, std (ddof 1) and n over seeds for every metric, and Welch's p-value against the baseline's runs.

    >>> runs = [RunRecord("baseline", s, 8, "none", 0.0, 0.0, 1, None, {"ggn_trace": 1.0 + s}) for s in range(3)]
    >>> runs += [RunRecord("gaussian", s, 8, "gaussian", 1.0, 0.1, 1, None, {"ggn_trace": 5.0 + s}) for s in range(3)]
    >>> rows = summarise(runs, {"gaussian": 1.0})
    >>> [r.method for r in rows], rows[1].stats["ggn_trace"]["mean"], round(rows[1].stats["ggn_trace"]["p_value"], 4)
    (['baseline', 'gaussian'], 6.0, 0.008)
    """
    by_method: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    base = by_method.get("baseline", [])
    keys = sorted({k for r in runs for k in r.metrics})
    rows = []
    for method in TABLE1_METHODS:
        mine = by_method.get(method.key)
        if not mine:
            continue
        stats = {}
        for k in keys:
            vals = [r.metrics.get(k, math.nan) for r in mine]
            mean, std, n = _mean_std(vals)
            p = math.nan
            if method.key != "baseline" and base:
                p = welch_p_value(vals, [r.metrics.get(k, math.nan) for r in base])
            stats[k] = {"mean": mean, "std": std, "n": n, "p_value": p}
        rows.append(
            Table1Row(
                method=method.key,
                label=method.label,
                batch_size=mine[0].batch_size,
                kappa_ratio=float(kappa_ratios.get(method.noise, 0.0)) if method.noise != "none" else 0.0,
                n=len(mine),
                stats=stats,
                paper=PAPER_TABLE1.get(method.key),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- the pipeline


def _log(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


def _run_config(
    preset: Table1Preset,
    *,
    noise: str,
    batch_size: int,
    kappa_ratio: float,
    seed: int,
    out: Path | None,
    num_train: int,
    max_steps: int | None,
    device: str,
    progress: bool,
    trace: bool,
    splits: tuple[str, str] | None = None,
) -> TrainConfig:
    values = dict(preset.train)
    values.update(
        batch_size=batch_size,
        noise=noise,
        kappa=None,
        kappa_ratio=kappa_ratio if noise != "none" else None,
        seed=seed,
        out=str(out) if out is not None else None,
        device=device,
        progress=progress,
        trace_every=0,
        trace_samples=preset.trace_samples,
        trace_method="exact",
    )
    if splits is not None:
        values["train_split"], values["eval_split"] = splits
    cfg = TrainConfig.from_dict(values)
    steps = int(resolve_config(cfg, num_train).steps)
    if max_steps is not None:
        if max_steps < 1:
            raise GmixError(f"max_steps must be >= 1, got {max_steps}")
        steps = min(steps, max_steps)
        cfg = dataclasses.replace(cfg, steps=steps, epochs=None)
    if trace and preset.trace_points > 0:
        cfg = dataclasses.replace(cfg, trace_every=max(1, steps // preset.trace_points))
    return cfg


def _train_run(cfg: TrainConfig, datasets: tuple[Any, Any]) -> Any:
    """Train, continuing from the run's checkpoint when one is there (a finished run returns at once)."""
    resume = cfg.out is not None and (Path(cfg.out) / "checkpoint.pt").exists()
    return train(cfg, resume=resume, datasets=datasets)


def _read_trace(out: str | None) -> list[dict[str, float]]:
    if out is None:
        return []
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "trace":
            recs.append({k: v for k, v in rec.items() if isinstance(v, int | float)})
    return recs


def _annotate_trace(trace: list[dict[str, float]], config: TrainConfig) -> list[dict[str, float]]:
    """Add to each along-training record the learning rate of its step (``lr``: the rate of the next optimizer
    step, the last one's at the end) and ``edge_ratio`` = λ_max(G) / :func:`stability_threshold` at that rate."""
    lr_fn = schedule_from_config(config, int(config.steps))
    for rec in trace:
        step = min(int(rec.get("step", 0)), int(config.steps) - 1)
        rec["lr"] = float(lr_fn(step))
        thr = stability_threshold(config.optimizer, rec["lr"], config.momentum)
        rec["edge_ratio"] = rec.get("top_eigenvalue", math.nan) / thr if thr > 0 else math.nan
    return trace


def _selection_rule() -> str:
    return (
        "per noise kind, the r with the highest mean validation accuracy over the selection seeds; ties to the "
        "lower mean validation loss, then to the smaller r; a diverged run scores accuracy 0 and loss inf"
    )


def select_kappa(
    preset: str | Table1Preset,
    *,
    noises: Sequence[str] = ("gaussian", "rademacher"),
    out: str | Path | None = None,
    data_dir: str | None = None,
    max_steps: int | None = None,
    device: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> KappaSelection:
    """Choose r = κ·B (Eq. 12 with κ in units of the mean weight 1/B) for each noise kind without looking at
    the test split: train at the preset's large batch on ``select_splits[0]`` (``fit``) for every candidate
    r of ``kappa_sweep`` and ``select_seeds`` seeds, score on ``select_splits[1]`` (``val``), and apply the
    rule of :func:`_selection_rule`. The averaging baseline is trained and scored too, for reference only.

    >>> quick = dataclasses.replace(table1_preset("micro"), kappa_sweep=(1.0, 3.0))
    >>> sel = select_kappa(quick, noises=["gaussian"])
    >>> sel.splits, sel.chosen["gaussian"] in (1.0, 3.0), len(sel.scores)  # 1 baseline + 2 candidates
    (('fit', 'val'), True, 3)
    """
    p = table1_preset(preset)
    if not p.kappa_sweep:
        raise GmixError(f"preset {p.name!r} has no kappa sweep; give kappa or kappa_ratio")
    with cpu_threads(p.threads):
        return _select_kappa(p, noises, out, data_dir, max_steps, device, progress, log)


def _select_kappa(p, noises, out, data_dir, max_steps, device, progress, log) -> KappaSelection:
    data = p.train.get("data", "digits")
    fit, val = (load_dataset(data, s, data_dir) for s in p.select_splits)
    ctx = init_distributed(device)
    root = Path(out) if out is not None else None
    scores: list[dict[str, Any]] = []
    cells = [("none", 0.0)] + [(nz, r) for nz in noises for r in p.kappa_sweep]
    for noise, r in cells:
        for seed in range(p.select_seeds):
            run_out = root / f"{noise}-r{r:g}-seed{seed}" if root is not None else None
            cfg = _run_config(
                p, noise=noise, batch_size=p.batch_size, kappa_ratio=r, seed=seed, out=run_out, num_train=len(fit),
                max_steps=max_steps, device=device, progress=progress, trace=False, splits=p.select_splits,
            )
            try:
                res = _train_run(cfg, (fit, val))
                ev = evaluate(res.model, val, device=ctx.device, ctx=ctx)
                acc, loss = ev["acc"], ev["loss"]
            except TrainingDiverged:
                acc, loss = 0.0, math.inf
            scores.append({"noise": noise, "kappa_ratio": r, "seed": seed, "val_acc": acc, "val_loss": loss})
            _log(log, f"select {noise} r={r:g} seed={seed}: val acc {100 * acc:.2f}%, val loss {loss:.4f}")
    chosen = {}
    for noise in noises:
        best = None
        for r in p.kappa_sweep:
            mine = [s for s in scores if s["noise"] == noise and s["kappa_ratio"] == r]
            acc = float(np.mean([s["val_acc"] for s in mine]))
            loss = float(np.mean([s["val_loss"] for s in mine]))
            key = (-acc, loss, r)
            if best is None or key < best[0]:
                best = (key, r)
        chosen[noise] = best[1]
    return KappaSelection(_selection_rule(), tuple(p.select_splits), p.batch_size, tuple(p.kappa_sweep), scores,
                          chosen)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count (None or 0: unchanged).

    >>> before = torch.get_num_threads()
    >>> with cpu_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if not n:
        yield
        return
    if not isinstance(n, int) or n < 0:
        raise GmixError(f"threads must be an integer >= 0, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_table1(
    preset: str | Table1Preset = "tiny",
    *,
    seeds: int | None = None,
    kappa: float | None = None,
    kappa_ratio: float | None = None,
    out: str | Path | None = None,
    data_dir: str | None = None,
    max_steps: int | None = None,
    device: str = "auto",
    progress: bool = False,
    plot: bool = True,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> Table1Result:
    """Run Table 1 end to end (see the module docstring) and return a :class:`Table1Result`.

    ``seeds`` overrides the preset's number of seeds (0..seeds-1, shared by all rows, so runs of one seed
    start from the same initialisation and data order). ``kappa`` (κ at the large batch) or ``kappa_ratio``
    (r = κ·B) fixes κ for both noise kinds; otherwise a preset with a sweep runs :func:`select_kappa`, and
    one without uses its ``kappa_ratio``. ``max_steps`` caps every run's length (the schedule is compressed
    to it; for smoke tests). With ``out``, runs go to ``OUT/<method>-seed<seed>/`` (checkpoint, config,
    metrics), the sweep to ``OUT/select/``, and the tables, JSON, CSV and figures to ``OUT``
    (:func:`write_table1`); a run whose checkpoint is there continues from it (a finished one is reused).
    ``threads`` overrides the preset's pinned CPU thread count (0: torch's default; see :class:`Table1Preset`).

    >>> quick = dataclasses.replace(table1_preset("micro"), methods=("baseline", "gaussian"), trace_points=0, seeds=1)
    >>> res = run_table1(quick, kappa_ratio=1.0)
    >>> [r.method for r in res.rows], res.row("gaussian").kappa_ratio, res.runs[1].kappa  # κ = r / B, B = 64
    (['baseline', 'gaussian'], 1.0, 0.015625)
    """
    p = table1_preset(preset)
    if threads is not None:
        p = dataclasses.replace(p, threads=threads)
    with cpu_threads(p.threads):
        return _run_table1(p, seeds, kappa, kappa_ratio, out, data_dir, max_steps, device, progress, plot, log)


def _run_table1(p, seeds, kappa, kappa_ratio, out, data_dir, max_steps, device, progress, plot, log) -> Table1Result:
    start = time.perf_counter()
    n_seeds = p.seeds if seeds is None else seeds
    if not isinstance(n_seeds, int) or n_seeds < 1:
        raise GmixError(f"seeds must be an integer >= 1, got {n_seeds!r}")
    if kappa is not None and kappa_ratio is not None:
        raise GmixError("give kappa or kappa_ratio, not both")
    if kappa is not None:
        if not kappa > 0:
            raise GmixError(f"kappa must be > 0, got {kappa}")
        kappa_ratio = kappa * p.batch_size
    if kappa_ratio is not None and not kappa_ratio > 0:
        raise GmixError(f"kappa_ratio must be > 0, got {kappa_ratio}")
    if p.needs_data_dir and data_dir is None:
        raise GmixError(f"preset {p.name!r} needs --data-dir, the directory holding the CIFAR python files")
    data = p.train.get("data", "digits")
    train_ds = load_dataset(data, p.train.get("train_split", "train"), data_dir)
    test_ds = load_dataset(data, p.train.get("eval_split", "test"), data_dir)
    measure_ds = test_ds if p.measure_split == p.train.get("eval_split", "test") else load_dataset(
        data, p.measure_split, data_dir)
    samples = {  # seeds 0 and 1: the draws the tables of earlier versions measured on
        "measure": Table1Samples.draw(data, p.measure_split, len(measure_ds), p.measure_samples, 0),
        "eigen": Table1Samples.draw(data, p.train.get("train_split", "train"), len(train_ds), p.eigen_samples or None,
                                    1),
    }
    measure_ds = samples["measure"].select(measure_ds)
    eigen_ds = samples["eigen"].select(train_ds)
    ctx = init_distributed(device)
    root = Path(out) if out is not None else None
    if root is not None and ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)

    selection = None
    if kappa_ratio is not None:
        ratios = {"gaussian": float(kappa_ratio), "rademacher": float(kappa_ratio)}
    elif p.kappa_sweep:
        selection = select_kappa(
            p, noises=[_METHOD[k].noise for k in p.methods if _METHOD[k].noise != "none"],
            out=root / "select" if root is not None else None, data_dir=data_dir, max_steps=max_steps,
            device=device, progress=progress, log=log,
        )
        ratios = dict(selection.chosen)
    else:
        ratios = {"gaussian": p.kappa_ratio, "rademacher": p.kappa_ratio}
    _log(log, "r = κ·B: " + ", ".join(f"{k} {v:g}" for k, v in ratios.items()))

    dtype = torch.float64 if p.measure_dtype == "float64" else torch.float32
    runs: list[RunRecord] = []
    for method in TABLE1_METHODS:
        if method.key not in p.methods or (method.small_batch and p.small_batch_size is None):
            continue
        batch = p.small_batch_size if method.small_batch else p.batch_size
        r = ratios.get(method.noise, 0.0)
        for seed in range(n_seeds):
            run_out = root / f"{method.key}-seed{seed}" if root is not None else None
            cfg = _run_config(
                p, noise=method.noise, batch_size=batch, kappa_ratio=r, seed=seed, out=run_out,
                num_train=len(train_ds), max_steps=max_steps, device=device, progress=progress, trace=True,
            )
            t0 = time.perf_counter()
            res = _train_run(cfg, (train_ds, test_ds))
            t1 = time.perf_counter()
            metrics = measure_run(
                res.model, res.config, measure_data=measure_ds, train_data=train_ds, eigen_data=eigen_ds,
                hessian_probes=p.hessian_probes, eig_tol=p.eig_tol, batch_size=p.measure_batch_size, dtype=dtype,
                generator_seed=seed, eigen=p.eigen_samples != 0,
            )
            rec = RunRecord(
                method=method.key, seed=seed, batch_size=batch, noise=method.noise,
                kappa_ratio=float(res.config.kappa_ratio), kappa=float(res.config.kappa), steps=int(res.steps),
                out=str(run_out) if run_out else None,
                metrics=metrics, trace=_annotate_trace(_read_trace(str(run_out) if run_out else None), res.config),
            )
            ratios_along = [t["edge_ratio"] for t in rec.trace if math.isfinite(t.get("edge_ratio", math.nan))]
            rec.metrics["edge_ratio_max"] = max(ratios_along) if ratios_along else math.nan
            runs.append(rec)
            _log(
                log,
                f"{method.key} seed={seed}: {res.steps} steps in {t1 - t0:.1f}s, measured in "
                f"{time.perf_counter() - t1:.1f}s; test acc {metrics['test_acc']:.2f}%, "
                f"Tr(G) {metrics['ggn_trace']:.4g}",
            )
    level, at = matched_loss_trace({i: r.trace for i, r in enumerate(runs)})
    for i, r in enumerate(runs):
        r.metrics["ggn_trace_matched"] = at.get(i, math.nan)
    rows = summarise(runs, ratios)
    first = _run_config(
        p, noise="none", batch_size=p.batch_size, kappa_ratio=0.0, seed=0, out=None, num_train=len(train_ds),
        max_steps=max_steps, device=device, progress=False, trace=False,
    )
    result = Table1Result(
        preset=p, kappa_ratios=ratios, selection=selection, runs=runs, rows=rows, matched_loss=level,
        momentum=float(first.momentum), optimizer=first.optimizer, out=root, samples=samples,
        data_dir=None if data_dir is None else str(data_dir),
    )
    result.seconds = time.perf_counter() - start
    if root is not None and ctx.is_main:
        write_table1(result, root, plot=plot)
    return result


# ------------------------------------------------------------------------------------------------- writers


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    return x


def write_table1(result: Table1Result, out: str | Path, *, plot: bool = True) -> dict[str, str]:
    """Write ``table1.md`` (the printed tables), ``table1.json`` (everything; NaN/inf as null),
    ``table1.csv`` (one line per method and metric: mean, std, n, Welch p, the paper's value),
    ``runs.csv`` (one line per run) and, with ``plot``, ``table1.png`` and ``trace_vs_loss.png``
    (:func:`plot_table1`, :func:`plot_trace_vs_loss`). Returns {kind: path}; also stored in ``result.files``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "table1.md", "json": out / "table1.json", "csv": out / "table1.csv",
             "runs_csv": out / "runs.csv"}
    text = result.format_table()
    if result.selection is not None:
        text += "\n\n" + result.selection.format_table()
    files["markdown"].write_text(text + "\n")
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "label", "batch_size", "kappa_ratio", "metric", "mean", "std", "n", "p_value_vs_baseline",
                    "paper"])
        for r in result.rows:
            for key, s in r.stats.items():
                paper = r.paper if key == "abs_log_ggn_trace" and r.paper is not None else ""
                w.writerow([r.method, r.label, r.batch_size, r.kappa_ratio, key, s["mean"], s["std"], s["n"],
                            s["p_value"], paper])
    keys = sorted({k for r in result.runs for k in r.metrics})
    with open(files["runs_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "batch_size", "noise", "kappa_ratio", "kappa", "steps", "out", *keys])
        for r in result.runs:
            w.writerow([r.method, r.seed, r.batch_size, r.noise, r.kappa_ratio, r.kappa, r.steps, r.out or "",
                        *[r.metrics.get(k, math.nan) for k in keys]])
    if plot:
        files["figure"] = plot_table1(result, out / "table1.png")
        if any(r.trace for r in result.runs):
            files["trace_figure"] = plot_trace_vs_loss(result, out / "trace_vs_loss.png")
    result.files = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(_finite_or_none(result.to_dict()), indent=2) + "\n")
    return result.files


def plot_table1(result: Table1Result, path: str | Path) -> Path:
    """Grouped bars with error bars (std over seeds): |log Tr(G)| beside the paper's (black diamonds), test
    accuracy, and the log₁₀ of every curvature quantity, one bar per method.

    Drawn on a :class:`matplotlib.figure.Figure`: matplotlib's backend and pyplot's figures are left alone."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    labels = {m.key: m.label for m in TABLE1_METHODS}
    rows = []
    logs = {"ggn_trace": "Tr(G)", "ef_trace": "Tr(EF)", "hessian_trace": "Tr(H)", "si_sharpness": "SI sharp.",
            "lambda_max_ggn": "λmax(G)", "lambda_max_hessian": "λmax(H)"}
    for r in result.runs:
        for key, name in logs.items():
            v = r.metrics.get(key, math.nan)
            rows.append({"method": labels[r.method], "quantity": name,
                         "value": math.log10(v) if v > 0 else math.nan})
    df = pd.DataFrame(rows)
    runs = pd.DataFrame([{"method": labels[r.method], **r.metrics} for r in result.runs])
    order = [labels[m.key] for m in TABLE1_METHODS if labels[m.key] in set(runs["method"])]
    fig = Figure(figsize=(16, 4.2))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 2.6]})
    sns.barplot(data=runs, x="method", y="abs_log_ggn_trace", order=order, errorbar="sd", ax=axes[0],
                hue="method", hue_order=order, legend=False)
    for i, name in enumerate(order):
        key = next(m.key for m in TABLE1_METHODS if m.label == name)
        if key in PAPER_TABLE1:
            axes[0].plot(i, PAPER_TABLE1[key], marker="D", color="black", linestyle="none",
                         label="paper (ResNet-18, CIFAR-10)" if key == "baseline" else None)
    axes[0].set(ylabel="|ln Tr(G)|", xlabel="", title="Table 1: |log Tr(G)|")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    sns.barplot(data=runs, x="method", y="test_acc", order=order, errorbar="sd", ax=axes[1], hue="method",
                hue_order=order, legend=False)
    lo = float(np.nanmin(runs["test_acc"])) if len(runs) else 0.0
    axes[1].set(ylabel="test accuracy (%)", xlabel="", title="accuracy", ylim=(max(0.0, lo - 5), 100))
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    sns.barplot(data=df, x="quantity", y="value", hue="method", hue_order=order, errorbar="sd", ax=axes[2])
    axes[2].set(ylabel="log₁₀ value", xlabel="", title="curvature (mean ± std over seeds)")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"Table 1, preset {result.preset.name!r}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_trace_vs_loss(result: Table1Result, path: str | Path) -> Path:
    """Along training (the engine's ``trace`` records, on a fixed training subset in eval mode), against the
    training loss: Tr(G), λ_max(G), and λ_max(G) over the stability threshold at the learning rate of that
    step (1 = the edge of stability). One line per run, one colour per method; the dashed line marks the
    matched loss L*. Drawn on a :class:`matplotlib.figure.Figure`, as :func:`plot_table1`."""
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    labels = {m.key: m.label for m in TABLE1_METHODS}
    palette = dict(zip([m.key for m in TABLE1_METHODS], sns.color_palette(n_colors=len(TABLE1_METHODS))))
    fig = Figure(figsize=(17, 4.6))
    axes = fig.subplots(1, 3)
    seen: set[str] = set()
    for r in result.runs:
        recs = [t for t in r.trace if t.get("loss", 0) > 0 and t.get("ggn_trace", 0) > 0]
        if not recs:
            continue
        loss = [t["loss"] for t in recs]
        label = labels[r.method] if r.method not in seen else None
        seen.add(r.method)
        style = {"marker": ".", "color": palette[r.method], "label": label, "alpha": 0.8}
        axes[0].plot(loss, [t["ggn_trace"] for t in recs], **style)
        axes[1].plot(loss, [t.get("top_eigenvalue", math.nan) for t in recs], **style)
        axes[2].plot(loss, [t.get("edge_ratio", math.nan) for t in recs], **style)
    axes[2].axhline(1.0, color="black", linestyle=":", linewidth=1)
    axes[2].set_ylim(bottom=1e-2)  # below 1 % of the threshold (warmup start, end of the decay): not informative
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()
        ax.set_xlabel("training loss (fixed training subset, eval mode) → training goes on")
        if result.matched_loss is not None:
            ax.axvline(result.matched_loss, color="grey", linestyle="--", linewidth=1)
    axes[0].set(ylabel="Tr(G)", title="Tr(G) along training (dashed: matched loss L*)")
    axes[1].set(ylabel="λmax(G)", title="top eigenvalue of G")
    axes[2].set(ylabel="λmax(G) · η_t / 2(1+μ)", title="λmax(G) over the threshold at the step's LR (1: edge)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
