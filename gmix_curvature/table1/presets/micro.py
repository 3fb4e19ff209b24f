"""``micro``: seconds long, for tests — the digits CNN of width 4, a few steps, 2 seeds."""

from __future__ import annotations

from types import MappingProxyType

from gmix_curvature.table1.presets._base import Table1Preset
from gmix_curvature.table1.presets.tiny import TINY_TRAIN

PRESET = Table1Preset(
    name="micro",
    description="seconds-long end-to-end check: digits CNN of width 4, a few steps, 2 seeds",
    train=MappingProxyType({**TINY_TRAIN, "model_kwargs": {"width": 4}, "epochs": None, "steps": 4,
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
)
RANK = 2
