"""The result object every curvature estimator returns, and the warning of an untrustworthy error bar."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CurvatureResult", "EstimatorWarning", "CONVENTION"]

CONVENTION = (
    "G = (1/n) sum_t J_t^T H_t J_t, the mean over the n counted predictions t (samples of (N, C) logits, else "
    "positions/pixels/labels whose label is not ignore_index: extra['n_predictions']), H_t the Hessian of the "
    "loss in the logits: cross_entropy diag(p_t) - p_t p_t^T (Eq. 5 of the paper for (N, C) logits), mse 2I/D "
    "for a D-dim output (F.mse_loss's mean), bce sigma(1 - sigma) per label; i.e. the GGN of the mean loss"
)


class EstimatorWarning(UserWarning):
    """A stochastic estimate whose standard error cannot be trusted (e.g. ``fisher_mc`` on a confident model)."""


@dataclass
class CurvatureResult:
    """One curvature estimate.

    ``value`` is the estimate (a trace is the mean over the counted predictions, Eq. 5 and ``CONVENTION``;
    ``n_samples`` counts samples, ``extra["n_predictions"]`` the predictions); ``stderr`` its standard error
    (None for exact values or a single probe); ``per_param`` maps parameter names to their block traces
    Tr(G_ll) (``per_param_stderr`` their standard errors where stochastic). ``bn_mode`` says whether
    BatchNorm used running statistics (``"eval"``) or batch statistics (``"train"``). ``extra`` holds
    method-specific diagnostics (the effective sample size of ``fisher_mc``, eigenvalues, ...).

    >>> r = CurvatureResult(value=2.0, stderr=0.1, n_samples=8, n_probes=4, method="fisher_is")
    >>> round(r.rel_stderr, 3), r.log_abs
    (0.05, 0.6931471805599453)
    >>> CurvatureResult.from_json(r.to_json()) == r
    True
    """

    value: float
    stderr: float | None
    n_samples: int
    n_probes: int
    method: str
    bn_mode: str = "eval"
    seconds: float = 0.0
    quantity: str = "ggn_trace"
    convention: str = CONVENTION
    per_param: dict[str, float] = field(default_factory=dict)
    per_param_stderr: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rel_stderr(self) -> float | None:
        """stderr / |value| (inf when the value is zero and the stderr is not)."""
        if self.stderr is None:
            return None
        if self.value == 0:
            return 0.0 if self.stderr == 0 else math.inf
        return self.stderr / abs(self.value)

    @property
    def log_abs(self) -> float:
        """|log Tr| as Table 1 of the paper prints it (natural logarithm)."""
        return abs(math.log(self.value)) if self.value > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (``rel_stderr`` and ``log_abs`` included)."""
        d = asdict(self)
        d["rel_stderr"] = self.rel_stderr
        d["log_abs"] = self.log_abs
        return d

    def to_json(self) -> str:
        """The result as a JSON string."""
        return json.dumps(self.to_dict(), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> CurvatureResult:
        """Read a result written by :meth:`to_json`."""
        d = json.loads(text)
        d.pop("rel_stderr", None)
        d.pop("log_abs", None)
        return cls(**d)
