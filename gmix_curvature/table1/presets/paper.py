"""``paper``: ResNet-18 on CIFAR-10 at batch 8192 against 200, Section 5.1 (needs ``--data-dir``)."""

from __future__ import annotations

from types import MappingProxyType

from gmix_curvature.table1.presets._base import Table1Preset
from gmix_curvature.table1.presets.tiny import TINY_TRAIN

PRESET = Table1Preset(
    name="paper",
    description="ResNet-18 on CIFAR-10 (--data-dir), batch 8192 vs 200, SGD momentum 0.9, 200 epochs (§5.1)",
    # the same optimizer and schedule as tiny (Section 5.1), on ResNet-18/CIFAR-10 for 200 epochs
    train=MappingProxyType(
        {
            **TINY_TRAIN,
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
)
RANK = 1
