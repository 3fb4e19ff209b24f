"""gmix-curvature: GradientMix for large-batch training, and the curvature of what it finds.

The public API is flat: everything in ``__all__`` is importable from ``gmix_curvature``.
Conventions, kept everywhere: Tr(G) is the mean over samples (the 1/n of Eq. 5); curvature is taken in eval
mode unless asked otherwise; the mixing weights π have mean 1/B.
"""

__version__ = "0.1.0"

from gmix_curvature.checkpoint import load_checkpoint, save_checkpoint
from gmix_curvature.curvature import (
    CurvatureResult,
    EstimatorWarning,
    curvature_snapshot,
    deflated_ggn_trace,
    empirical_fisher_trace,
    exact_ggn_trace,
    fisher_is_ggn_trace,
    fisher_mc_ggn_trace,
    ggn_trace,
    ggn_vector_product,
    hessian_trace,
    hessian_vector_product,
    hutchinson_ggn_trace,
    output_hutchinson_ggn_trace,
    scale_invariant_sharpness,
    top_eigenvalues,
    trace_checkpoint,
)
from gmix_curvature.data import ArrayDataset, load_dataset
from gmix_curvature.distributed import mixing_comm_hook
from gmix_curvature.dose_response import summarise_dose, write_dose_response
from gmix_curvature.errors import (
    CheckpointError,
    GmixError,
    RunLocked,
    RunWriteError,
    TrainingDiverged,
    TrainingInterrupted,
)
from gmix_curvature.lock import run_lock
from gmix_curvature.mixing import device_mixed_loss, expand_group_weights, mixed_loss, per_sample_gradients_loop
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
from gmix_curvature.optim import (
    LARS,
    ScheduleLR,
    apply_bn_gamma0,
    build_optimizer,
    build_schedule,
    inverse_sqrt_lr,
    polynomial_lr,
)
from gmix_curvature.preemption import stop_on_signals
from gmix_curvature.sweep import gather_sweep, run_sweep
from gmix_curvature.table1 import run_table1
from gmix_curvature.theory import (
    eq18_second_moment,
    gradient_noise_scale,
    second_moment,
    theorem1_bound,
    theorem1_step_limit,
)
from gmix_curvature.theory_checks import run_theory_checks
from gmix_curvature.train import TrainConfig, TrainResult

__all__ = [
    "__version__",
    # noise (Eq. 12)
    "NoiseKind",
    "sample_weights",
    "gamma",
    "zeta",
    "expected_gamma",
    "kappa_from_ratio",
    "max_kappa",
    # mixing (Eq. 3, Eq. 4)
    "mixed_loss",
    "device_mixed_loss",
    "expand_group_weights",
    "per_sample_gradients_loop",
    "mixing_comm_hook",
    # training (the function is gmix_curvature.train.train: the module keeps its name)
    "TrainConfig",
    "TrainResult",
    # optimizers and schedules
    "build_optimizer",
    "build_schedule",
    "polynomial_lr",
    "inverse_sqrt_lr",
    "ScheduleLR",
    "LARS",
    "apply_bn_gamma0",
    # curvature
    "ggn_trace",
    "exact_ggn_trace",
    "hutchinson_ggn_trace",
    "fisher_mc_ggn_trace",
    "fisher_is_ggn_trace",
    "deflated_ggn_trace",
    "output_hutchinson_ggn_trace",
    "empirical_fisher_trace",
    "hessian_trace",
    "top_eigenvalues",
    "scale_invariant_sharpness",
    "curvature_snapshot",
    "ggn_vector_product",
    "hessian_vector_product",
    "trace_checkpoint",
    "CurvatureResult",
    "EstimatorWarning",
    # theory
    "second_moment",
    "eq18_second_moment",
    "theorem1_bound",
    "theorem1_step_limit",
    "gradient_noise_scale",
    "run_theory_checks",
    # Table 1, sweeps and the κ dose-response
    "run_table1",
    "run_sweep",
    "gather_sweep",
    "summarise_dose",
    "write_dose_response",
    # data, models, checkpoints
    "ArrayDataset",
    "load_dataset",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    # runs: one writer, preemption
    "run_lock",
    "stop_on_signals",
    # errors
    "GmixError",
    "CheckpointError",
    "TrainingDiverged",
    "TrainingInterrupted",
    "RunLocked",
    "RunWriteError",
]
