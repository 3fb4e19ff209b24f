"""What a Table 1 run records: one :class:`RunRecord` per trained run, one :class:`Table1Row` per method, the κ
sweep (:class:`KappaSelection`), the measured samples (:class:`Table1Samples`) and the whole
:class:`Table1Result`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gmix_curvature.data import load_dataset
from gmix_curvature.errors import GmixError
from gmix_curvature.table1.methods import METRIC, PAPER_TABLE1, TABLE1_METRICS
from gmix_curvature.table1.presets import Table1Preset
from gmix_curvature.table1.stats import PairedDifference, mean_std

__all__ = ["RunRecord", "Table1Row", "KappaSelection", "Table1Samples", "Table1Result"]


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
        fmt = METRIC[key].fmt
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
            acc = mean_std([100 * x["val_acc"] for x in rows])[0]
            loss = mean_std([x["val_loss"] for x in rows])[0]
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
    the summary rows, the paired comparisons by seed (``comparisons``, :class:`PairedDifference`, Holm over
    the metrics of each comparison) and the verdicts on the paper's claims (``verdicts``, :class:`Verdict`),
    the matched training loss L*, where the outputs are, and which samples were measured:
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
    comparisons: list[PairedDifference] = field(default_factory=list)
    verdicts: list[Any] = field(default_factory=list)

    def measure_data(self, data_dir: str | None = None) -> Any:
        """The samples the curvature columns were measured on (Tr(G), EF, Hessian, SI sharpness, accuracy), as a
        data set: the same inputs and labels, in the same order. ``data_dir`` defaults to the run's."""
        from gmix_curvature.table1.measure import table1_data

        return table1_data(self, "measure", data_dir=data_dir)

    def eigen_data(self, data_dir: str | None = None) -> Any:
        """The training samples λ_max of G and of the Hessian were measured on, as :meth:`measure_data`."""
        from gmix_curvature.table1.measure import table1_data

        return table1_data(self, "eigen", data_dir=data_dir)

    def row(self, method: str) -> Table1Row:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def comparison(self, row: str, metric: str, reference: str = "baseline") -> PairedDifference:
        """The paired comparison of ``row`` against ``reference`` on ``metric``."""
        for c in self.comparisons:
            if (c.row, c.reference, c.metric) == (row, reference, metric):
                return c
        raise KeyError((row, reference, metric))

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
            "comparisons": [c.to_dict() for c in self.comparisons],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "runs": [r.to_dict() for r in self.runs],
            "seconds": self.seconds,
            "files": self.files,
            "samples": {k: v.to_dict() for k, v in self.samples.items()},
            "data_dir": self.data_dir,
        }

    def format_table(self) -> str:
        """The tables as Markdown (:func:`~gmix_curvature.table1.tables.format_table1`)."""
        from gmix_curvature.table1.tables import format_table1

        return format_table1(self)
