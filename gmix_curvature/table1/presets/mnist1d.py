"""``mnist1d``: MNIST-1D (Greydanus 2020), a 1-D CNN with BatchNorm, batch 1000 against 32, 10 seeds (issue 16).

The benchmark on which a large batch visibly hurts: 4,000 training signals, so batch 1000 is a quarter of the
training set per step (8192 is 16 % of CIFAR-10's), and the test accuracy drops by about 3–4 points against
batch 32 at the same linearly scaled learning rate and number of epochs. SGD with momentum 0.9 and weight decay
5·10⁻⁴ as Section 5.1; linear scaling 0.1 per 128 samples (0.78 at batch 1000, 0.025 at 32), 6 epochs of warmup
then cosine decay to 0 over 60 epochs. κ chosen per noise kind on fit/val among r = κ·B ∈ {1, 2, 4}
(γ̄ = 1 + r² ∈ {2, 5, 17}), two seeds each. Ten seeds: the paired comparisons then detect (80 % power)
differences of about 1.1 paired standard deviations (theory/TABLE1.md).
"""

from __future__ import annotations

from types import MappingProxyType

from gmix_curvature.table1.presets._base import Table1Preset
from gmix_curvature.table1.presets.tiny import TINY_TRAIN

PRESET = Table1Preset(
    name="mnist1d",
    description="1-D CNN (3 Conv1d+BatchNorm) on MNIST-1D (4,000 train signals), batch 1000 vs 32, 10 seeds, "
    "60 epochs",
    train=MappingProxyType(
        {
            **TINY_TRAIN,
            "model": "mnist1d_cnn",
            "data": "mnist1d",
            "base_batch": 128,
            "schedule": "cosine",
            "epochs": 60,
            "warmup_epochs": 6,
        }
    ),
    batch_size=1000,
    small_batch_size=32,
    seeds=10,
    kappa_ratio=1.0,
    kappa_sweep=(1.0, 2.0, 4.0),
    select_splits=("fit", "val"),
    select_seeds=2,
    eigen_samples=500,
    hessian_probes=16,
    measure_dtype="float64",
    trace_points=12,
    trace_samples=256,
    threads=1,
    notes="batch 1000 is 25 % of the training set per step; linear scaling 0.1 per 128 samples, warmup 6 epochs "
    "and cosine decay; one CPU thread so that the table does not depend on the core count",
)
RANK = 3
