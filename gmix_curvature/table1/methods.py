"""The rows of Table 1 (the methods compared), the paper's numbers, and the measured columns (the metrics).

A row is a noise kind of Eq. 12 at the preset's large batch (``"none"``: the averaging baseline) or the small-batch
reference; a metric is one measured quantity of a run, with where it is measured and how it prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["Table1Method", "Table1Metric", "TABLE1_METHODS", "TABLE1_METRICS", "PAPER_TABLE1", "METHOD", "METRIC"]

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
METHOD: Mapping[str, Table1Method] = MappingProxyType({m.key: m for m in TABLE1_METHODS})


@dataclass(frozen=True)
class Table1Metric:
    """A measured column: ``key`` (as in :attr:`RunRecord.metrics`), its table ``header``, number format,
    where it is measured (``measure`` split, ``train`` split, the ``config``, or along training: ``trace``)."""

    key: str
    header: str
    fmt: str
    where: str
    doc: str


_M = Table1Metric
TABLE1_METRICS: tuple[Table1Metric, ...] = (
    _M("test_acc", "test acc. (%)", "{:.2f}", "measure", "accuracy on the measure split, eval mode, in %"),
    _M("test_loss", "test loss", "{:.4f}", "measure", "mean cross-entropy on the measure split"),
    _M("abs_log_ggn_trace", "|log Tr(G)|", "{:.2f}", "measure", "|ln Tr(G)|, the quantity of Table 1"),
    _M("log_ggn_trace", "log Tr(G)", "{:.2f}", "measure", "ln Tr(G), signed"),
    _M("ggn_trace", "Tr(G)", "{:.3g}", "measure", "exact Tr(G), Eq. 5, mean over samples"),
    _M("ef_trace", "Tr(EF)", "{:.3g}", "measure", "empirical-Fisher trace (1/n)Σ‖∇ℓ_i‖² (Eq. 10 / n)"),
    _M("hessian_trace", "Tr(H)", "{:.3g}", "measure", "Hessian trace of the mean loss, Hutchinson"),
    _M("si_sharpness", "SI sharpness", "{:.3g}", "measure", "Σ_l ‖θ_l‖² Tr(G_ll) over scale-invariant groups"),
    _M("si_weight_norm2", "‖θ_SI‖²", "{:.3g}", "measure", "Σ_l ‖θ_l‖² over the same groups"),
    _M("train_loss", "train loss", "{:.3g}", "train", "mean cross-entropy on the training split, eval mode"),
    _M("train_acc", "train acc. (%)", "{:.2f}", "train", "accuracy on the training split, eval mode, in %"),
    _M("lambda_max_ggn", "λmax(G)", "{:.3g}", "train", "top eigenvalue of G, Lanczos"),
    _M("lambda_max_hessian", "λmax(H)", "{:.3g}", "train", "top eigenvalue of the Hessian, Lanczos"),
    _M("lr_peak", "η peak", "{:.3g}", "config", "peak learning rate (linear scaling)"),
    _M("lr_final", "η final", "{:.3g}", "config", "learning rate of the last optimizer step"),
    _M("threshold_peak", "2(1+μ)/η peak", "{:.3g}", "config", "stability threshold at the peak LR"),
    _M("threshold_final", "2(1+μ)/η final", "{:.3g}", "config", "stability threshold at the final LR"),
    _M("edge_ratio_max", "max λmax/thr", "{:.3g}", "trace",
       "largest λ_max(G)/threshold(η_t) along training (eval mode); 1 = edge of stability"),
    _M("ggn_trace_matched", "Tr(G) @ L*", "{:.3g}", "trace", "Tr(G) along training at the matched loss L*"),
)
METRIC: Mapping[str, Table1Metric] = MappingProxyType({m.key: m for m in TABLE1_METRICS})
