"""``tiny``: the digits CNN on the embedded digits, batch 512 against 32, 3 seeds, 60 epochs (``make demo``)."""

from __future__ import annotations

from types import MappingProxyType

from gmix_curvature.table1.presets._base import Table1Preset

# Section 5.1's optimizer and schedule, shared by the paper preset
TINY_TRAIN = MappingProxyType(
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

PRESET = Table1Preset(
    name="tiny",
    description="digits CNN on the embedded digits (1,437 train images), batch 512 vs 32, 3 seeds, 60 epochs",
    train=TINY_TRAIN,
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
    "that the table does not depend on the machine's core count; 3 seeds keep make demo within 5 minutes, "
    "so the table states the differences it cannot detect; see theory/TABLE1.md",
)
RANK = 0
