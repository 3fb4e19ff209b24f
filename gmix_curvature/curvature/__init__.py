"""Curvature of trained networks: Tr(G(θ)) (Eq. 5, the mean over samples) exact and stochastic, the
empirical-Fisher and Hessian traces, top eigenvalues, per-parameter block traces, scale-invariant
sharpness, and a cheap snapshot for training. One estimator family per module; derivations in
theory/CURVATURE.md.

Convention: G(θ) = (1/n) Σ_i J_iᵀ H_i J_i, H_i = diag(p_i) - p_i p_iᵀ, the model in eval mode (BatchNorm
running statistics) unless ``bn_mode="train"``; every result records its method and BatchNorm mode. For
outputs with several predictions per sample ((N, T, C), (N, C, d1, …), multi-label) and the ``"mse"`` and
``"bce"`` losses: the mean over the n counted predictions (labels ≠ ``ignore_index``), the GGN of the loss
with torch's ``reduction="mean"`` (``CONVENTION``; theory/CURVATURE.md §8).
"""

from gmix_curvature.curvature._result import CONVENTION, CurvatureResult, EstimatorWarning
from gmix_curvature.curvature.deflated import deflated_ggn_trace
from gmix_curvature.curvature.eigen import top_eigenvalues
from gmix_curvature.curvature.empirical import empirical_fisher_trace
from gmix_curvature.curvature.exact import exact_ggn_trace
from gmix_curvature.curvature.ggn import GGNMethod, ggn_trace
from gmix_curvature.curvature.hessian import hessian_trace, hessian_vector_product
from gmix_curvature.curvature.hutchinson import ggn_vector_product, hutchinson_ggn_trace
from gmix_curvature.curvature.reference import dense_ggn, dense_hessian
from gmix_curvature.curvature.report import TraceReport, trace_checkpoint
from gmix_curvature.curvature.sampled import fisher_is_ggn_trace, fisher_mc_ggn_trace, output_hutchinson_ggn_trace
from gmix_curvature.curvature.sharpness import scale_invariant_groups, scale_invariant_sharpness
from gmix_curvature.curvature.snapshot import curvature_snapshot

__all__ = [
    # Tr(G)
    "ggn_trace",
    "GGNMethod",
    "exact_ggn_trace",
    "hutchinson_ggn_trace",
    "fisher_mc_ggn_trace",
    "fisher_is_ggn_trace",
    "output_hutchinson_ggn_trace",
    "deflated_ggn_trace",
    # other curvature
    "empirical_fisher_trace",
    "hessian_trace",
    "top_eigenvalues",
    "scale_invariant_sharpness",
    "scale_invariant_groups",
    "curvature_snapshot",
    "trace_checkpoint",
    "TraceReport",
    # products and references
    "ggn_vector_product",
    "hessian_vector_product",
    "dense_ggn",
    "dense_hessian",
    # results
    "CurvatureResult",
    "EstimatorWarning",
    "CONVENTION",
]
