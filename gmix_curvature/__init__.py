"""gmix-curvature: GradientMix for large-batch training, and the curvature of what it finds.

The public API is flat: everything below is importable from ``gmix_curvature``.
"""

__version__ = "0.1.0"

# noise
# mixing
# data and models
from gmix_curvature.checkpoint import load_checkpoint, save_checkpoint
from gmix_curvature.data import ArrayDataset, load_dataset
from gmix_curvature.errors import CheckpointError, GmixError, TrainingDiverged
from gmix_curvature.mixing import (
    device_mixed_loss,
    expand_group_weights,
    mixed_loss,
    per_sample_gradients_loop,
)
from gmix_curvature.models import build_model
from gmix_curvature.noise import (
    NoiseKind,
    expected_gamma,
    gamma,
    kappa_from_ratio,
    max_kappa,
    sample_weights,
    zeta,
)

# optimizers
from gmix_curvature.optim import build_optimizer, build_schedule, polynomial_lr

__all__ = [
    "__version__",
    # noise
    "NoiseKind",
    "sample_weights",
    "gamma",
    "zeta",
    "expected_gamma",
    "kappa_from_ratio",
    "max_kappa",
    # mixing
    "mixed_loss",
    "device_mixed_loss",
    "expand_group_weights",
    "per_sample_gradients_loop",
    # data and models
    "ArrayDataset",
    "load_dataset",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    # optimizers
    "build_optimizer",
    "build_schedule",
    "polynomial_lr",
    # errors
    "GmixError",
    "CheckpointError",
    "TrainingDiverged",
]
