"""What a Table 1 preset holds: :class:`Table1Preset`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Table1Preset"]


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
    table a function of the preset, the seeds and the machine. ``seeds`` is chosen from the power it gives
    (theory/TABLE1.md): the table states the smallest paired difference each comparison could detect.
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
