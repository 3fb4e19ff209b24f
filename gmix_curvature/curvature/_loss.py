"""The losses whose GGN the estimators measure, and the predictions of a batch as rows.

Convention (theory/CURVATURE.md §8). A model's output holds one or more *predictions* per sample: the
(N, C) logits of a classifier hold one, the (N, T, C) logits of a language model T (one per position),
the (N, C, d1, …) logits of a segmentation net d1·… (one per pixel), a multi-label head with L sigmoid
outputs L. G is the GGN of the loss as the model is trained with it, the mean over the n *counted*
predictions (labels that are not ``ignore_index``):

    G = (1/n) Σ_t J_tᵀ H_t J_t,     H_t = S_t S_tᵀ the Hessian of the per-prediction loss in its logits,

* ``cross_entropy``: H = diag(p) − ppᵀ (Eq. 5 of the paper for (N, C) logits, unchanged), S = diag(√p) − p√pᵀ;
* ``mse``: a prediction is the D-dimensional last axis of the output, ℓ = ‖f − y‖²/D, so that the mean over
  predictions is ``F.mse_loss``'s mean over elements: H = 2I/D, S = √(2/D) I;
* ``bce``: every output element is a prediction (a label of a multi-label head), ℓ the sigmoid
  cross-entropy, so that the mean is ``F.binary_cross_entropy_with_logits``'s: H = σ(1 − σ), S = √H.

So for every loss G is the GGN of ``F.<loss>(output, target)`` with its default ``reduction="mean"``.
Each loss gives, per prediction row (M rows of width K), the columns of S as weights ‖S e_c‖² (in logs)
and unit directions, the products S u and H a, Tr(H), a gradient at a label drawn from the model
(``fisher_mc``) and at the data's label (the empirical Fisher), and the summed loss (the Hessian).
Everything is computed from logits in log space, so that saturated outputs stay exact in float32.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from gmix_curvature.curvature._softmax import SoftmaxStats, ggn_quadratic_form, softmax_stats
from gmix_curvature.errors import GmixError

__all__ = [
    "Loss",
    "CrossEntropy",
    "MeanSquaredError",
    "BinaryCrossEntropy",
    "LOSSES",
    "get_loss",
    "Predictions",
    "sample_categorical",
    "nothing_counted",
]

_SAMPLE_CHUNK = 2**24  # elements of a (rows, classes) block sampled at once


def sample_categorical(logw: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One index per row drawn with probability ∝ exp(logw) (unnormalised), by the inverse CDF in float64.

    One uniform per row comes from ``g`` (a CPU generator), so the draws do not depend on the device;
    rows are processed in chunks of at most 2²⁴ elements.

    >>> g = torch.Generator().manual_seed(0)
    >>> sample_categorical(torch.tensor([[0.0, -torch.inf], [-torch.inf, 5.0]]), g).tolist()
    [0, 1]
    """
    m, k = logw.shape
    u = torch.rand(m, generator=g, dtype=torch.float64).to(logw.device)
    out = torch.empty(m, dtype=torch.int64, device=logw.device)
    step = max(1, _SAMPLE_CHUNK // max(k, 1))
    for lo in range(0, m, step):
        lw = logw[lo : lo + step].double()
        cdf = torch.exp(lw - lw.max(1, keepdim=True).values).cumsum(1)
        idx = torch.searchsorted(cdf, (u[lo : lo + step] * cdf[:, -1]).unsqueeze(1), right=True)
        out[lo : lo + step] = idx[:, 0].clamp_(max=k - 1)
    return out


@dataclass(frozen=True)
class Loss(abc.ABC):
    """A per-prediction loss ℓ(f, y) and its Hessian H = S Sᵀ in the logits f (rows of width K)."""

    name: ClassVar[str] = ""
    #: the torch functional whose mean this loss's G is the GGN of
    functional: ClassVar[str] = ""

    # --- layout ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def rows_layout(self, out: torch.Tensor, y: torch.Tensor) -> tuple[str, int, int]:
        """(layout, positions P, width K) of an output and its targets; raises GmixError on a mismatch."""

    def check_targets(self, f: torch.Tensor, t: torch.Tensor) -> None:  # noqa: B027 (optional: nothing to check)
        """Check the counted targets t against their rows f (M, K); the default accepts them."""

    def counted(self, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """The (N, P) mask of counted predictions from targets laid out (N, P, K). Float targets (``mse``,
        ``bce``): a prediction whose targets are NaN is not counted (the padding of a sequence regression, a
        missing label of a multi-label head); a prediction only partly NaN is an error."""
        nan = torch.isnan(targets)
        partly = nan.any(-1) & ~nan.all(-1)
        if bool(partly.any()):
            raise GmixError(
                f"{int(partly.sum())} predictions have targets that are partly NaN (loss {self.name!r}): a NaN "
                "target marks a whole prediction, the output's last axis, as not counted"
            )
        return ~nan.all(-1)

    # --- per-prediction quantities on rows f (M, K) ---------------------------------------------
    def stats(self, f: torch.Tensor) -> Any:
        return f.detach()

    @abc.abstractmethod
    def log_column_weights(self, s: Any) -> torch.Tensor:
        """log ‖S e_c‖² for every row and column, (M, K); their logsumexp is log Tr(H)."""

    @abc.abstractmethod
    def column_unit(self, s: Any, c: torch.Tensor) -> torch.Tensor:
        """S e_c / ‖S e_c‖ for one column c per row, (M, K)."""

    def log_trace_h(self, s: Any) -> torch.Tensor:
        return torch.logsumexp(self.log_column_weights(s), dim=1)

    @abc.abstractmethod
    def s_times(self, s: Any, u: torch.Tensor) -> torch.Tensor:
        """S u per row, (M, K)."""

    @abc.abstractmethod
    def h_times(self, s: Any, a: torch.Tensor) -> torch.Tensor:
        """H a per row, (M, K)."""

    @abc.abstractmethod
    def quadratic_form(self, s: Any, a: torch.Tensor) -> torch.Tensor:
        """aᵀ H a per row, (M,)."""

    @abc.abstractmethod
    def model_gradient(self, s: Any, g: torch.Generator, diag: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log ‖∇_f ℓ‖², ∇_f ℓ / ‖∇_f ℓ‖) at a label drawn from the model's predictive distribution
        (``fisher_mc``): E[∇ℓ ∇ℓᵀ] = H, and E[∇ℓ] = 0 (so the cross terms between positions vanish)."""

    @abc.abstractmethod
    def target_gradient(self, s: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log ‖∇_f ℓ(f, t)‖², the unit gradient) at the data's targets (the empirical Fisher)."""

    @abc.abstractmethod
    def total(self, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Σ_rows ℓ(f_row, t_row), differentiable in f."""


def _shape(t: torch.Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy (``F.cross_entropy``): H = diag(p) − ppᵀ (Eq. 5). Logits (N, C), (N, C, d1, …)
    (classes in dim 1, as ``F.cross_entropy`` reads them) or (N, d1, …, C) (classes last, as language models
    return them); integer labels of the output's shape without the class dimension."""

    name: ClassVar[str] = "cross_entropy"
    functional: ClassVar[str] = "F.cross_entropy"

    def rows_layout(self, out: torch.Tensor, y: torch.Tensor) -> tuple[str, int, int]:
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise GmixError(
                f"labels must be integer class indices, got {y.dtype} (loss 'cross_entropy'; float targets "
                "go with loss='mse' or 'bce')"
            )
        n = out.shape[0]
        if out.ndim < 2:
            raise GmixError(
                f"loss 'cross_entropy' needs logits with a class dimension, got shape {_shape(out)} "
                "(a single logit per sample: loss='bce')"
            )
        if out.ndim == 2:
            if _shape(y) != (n,):
                raise GmixError(f"labels of shape {_shape(y)} do not match logits {_shape(out)}: expected ({n},)")
            layout, k = "NC", out.shape[1]
        elif _shape(y) == (n, *out.shape[2:]):
            layout, k = "NCd", out.shape[1]  # F.cross_entropy's layout wins where both read
        elif _shape(y) == _shape(out)[:-1]:
            layout, k = "NdC", out.shape[-1]
        else:
            raise GmixError(
                f"labels of shape {_shape(y)} do not match logits {_shape(out)}: expected "
                f"{(n, *out.shape[2:])} (classes in dim 1, as F.cross_entropy) or {_shape(out)[:-1]} (classes last)"
            )
        if k < 2:
            raise GmixError(f"loss 'cross_entropy' needs at least 2 classes, got logits {_shape(out)} (use 'bce')")
        return layout, y[0].numel() if n else 1, k

    def counted(self, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        return targets[..., 0] != ignore_index

    def check_targets(self, f: torch.Tensor, t: torch.Tensor) -> None:
        k = f.shape[1]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            raise GmixError(
                f"labels out of range: found {int(t.min())}..{int(t.max())} for a model with {k} outputs "
                "(padding must equal ignore_index)"
            )

    def stats(self, f: torch.Tensor) -> SoftmaxStats:
        return softmax_stats(f)

    def log_column_weights(self, s: SoftmaxStats) -> torch.Tensor:
        return s.logp + s.log_dist2  # ‖S e_c‖² = p_c ‖p − e_c‖²

    def column_unit(self, s: SoftmaxStats, c: torch.Tensor) -> torch.Tensor:
        return s.unit_direction(c)  # S e_c = √p_c (e_c − p) ∝ −(p − e_c)

    def log_trace_h(self, s: SoftmaxStats) -> torch.Tensor:
        return s.log_trace_h

    def s_times(self, s: SoftmaxStats, u: torch.Tensor) -> torch.Tensor:
        return s.s_times(u)

    def h_times(self, s: SoftmaxStats, a: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(a.shape[0], device=a.device)
        delta = a - a[rows, s.top].unsqueeze(1)  # relative to the top class: exact on saturated outputs
        return s.p * (delta - (s.p * delta).sum(1, keepdim=True))

    def quadratic_form(self, s: SoftmaxStats, a: torch.Tensor) -> torch.Tensor:
        return ggn_quadratic_form(a, s)

    def model_gradient(self, s: SoftmaxStats, g: torch.Generator, diag: dict) -> tuple[torch.Tensor, torch.Tensor]:
        c = sample_categorical(s.logp, g)
        rows = torch.arange(c.shape[0], device=c.device)
        diag["expected_off_top"] = diag.get("expected_off_top", 0.0) + float(torch.exp(s.log1m_p[rows, s.top]).sum())
        diag["draws_off_top"] = diag.get("draws_off_top", 0.0) + float((c != s.top).sum())
        return s.log_dist2[rows, c], s.unit_direction(c)

    def target_gradient(self, s: SoftmaxStats, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(t.shape[0], device=t.device)
        return s.log_dist2[rows, t], s.unit_direction(t)

    def total(self, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(f, t, reduction="sum")


def _float_targets(loss: str, out: torch.Tensor, y: torch.Tensor) -> None:
    if not y.dtype.is_floating_point:
        raise GmixError(f"loss {loss!r} needs float targets of the output's shape, got {y.dtype}")
    if _shape(y) != _shape(out):
        raise GmixError(f"targets of shape {_shape(y)} do not match the output {_shape(out)} (loss {loss!r})")


@dataclass(frozen=True)
class MeanSquaredError(Loss):
    """Mean-squared error (``F.mse_loss``): a prediction is the last axis f ∈ ℝ^D, ℓ = ‖f − y‖²/D, H = 2I/D."""

    name: ClassVar[str] = "mse"
    functional: ClassVar[str] = "F.mse_loss"

    def rows_layout(self, out: torch.Tensor, y: torch.Tensor) -> tuple[str, int, int]:
        _float_targets(self.name, out, y)
        if out.ndim == 1:
            return "N", 1, 1
        return "NdC", math.prod(out.shape[1:-1]), out.shape[-1]

    def log_column_weights(self, f: torch.Tensor) -> torch.Tensor:
        return torch.full_like(f, math.log(2.0 / f.shape[1]))

    def column_unit(self, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.one_hot(c, f.shape[1]).to(f.dtype)

    def s_times(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0 / f.shape[1]) * u

    def h_times(self, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (2.0 / f.shape[1]) * a

    def quadratic_form(self, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (2.0 / f.shape[1]) * a.square().sum(1)

    def model_gradient(self, f: torch.Tensor, g: torch.Generator, diag: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # y' ~ N(f, (D/2) I), the density whose Fisher is H: ∇ℓ = (2/D)(f − y') = −√(2/D) ξ, ξ ~ N(0, I)
        xi = torch.randn(f.shape, generator=g, dtype=torch.float64).to(f)
        norm2 = xi.square().sum(1)
        return torch.log(norm2) + math.log(2.0 / f.shape[1]), xi / norm2.sqrt().unsqueeze(1)

    def target_gradient(self, f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = f - t
        norm2 = r.square().sum(1)
        unit = r / norm2.sqrt().clamp(min=torch.finfo(r.dtype).tiny).unsqueeze(1)
        return torch.log(norm2) + 2 * math.log(2.0 / f.shape[1]), unit

    def total(self, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (f - t).square().sum() / f.shape[1]


@dataclass(frozen=True)
class BinaryCrossEntropy(Loss):
    """Sigmoid cross-entropy (``F.binary_cross_entropy_with_logits``): every output element is a prediction
    (a label of a multi-label head, or the one logit of a binary classifier), H = σ(f)(1 − σ(f)); float
    targets in [0, 1] of the output's shape."""

    name: ClassVar[str] = "bce"
    functional: ClassVar[str] = "F.binary_cross_entropy_with_logits"

    def rows_layout(self, out: torch.Tensor, y: torch.Tensor) -> tuple[str, int, int]:
        _float_targets(self.name, out, y)
        return "N1", math.prod(out.shape[1:]), 1

    def check_targets(self, f: torch.Tensor, t: torch.Tensor) -> None:
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise GmixError(f"loss 'bce' needs targets in [0, 1], found {float(t.min()):g}..{float(t.max()):g}")

    def log_column_weights(self, f: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(f) + F.logsigmoid(-f)  # log σ(1 − σ), never 1 − σ by subtraction

    def column_unit(self, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(f)

    def s_times(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * self.log_column_weights(f)) * u

    def h_times(self, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_column_weights(f)) * a

    def quadratic_form(self, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return (torch.exp(self.log_column_weights(f)) * a.square()).sum(1)

    def model_gradient(self, f: torch.Tensor, g: torch.Generator, diag: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # y' ~ Bernoulli(σ(f)); ∇ℓ = σ − y' is σ(f) for y' = 0 and −σ(−f) for y' = 1
        logu = torch.log(torch.rand(f.shape, generator=g, dtype=torch.float64)).to(f.device)
        one = logu < F.logsigmoid(f.double())
        off = torch.exp(F.logsigmoid(-f.abs()))  # the probability of the less likely label
        diag["expected_off_top"] = diag.get("expected_off_top", 0.0) + float(off.sum())
        diag["draws_off_top"] = diag.get("draws_off_top", 0.0) + float((one != (f > 0)).sum())
        lg = torch.where(one, F.logsigmoid(-f), F.logsigmoid(f))
        return 2 * lg[:, 0], torch.where(one, -1.0, 1.0).to(f.dtype)

    def target_gradient(self, f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = torch.where(t == 1, -torch.sigmoid(-f), torch.where(t == 0, torch.sigmoid(f), torch.sigmoid(f) - t))
        return torch.log(grad.square())[:, 0], torch.sign(grad)

    def total(self, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(f, t, reduction="sum")


LOSSES: dict[str, Loss] = {cls.name: cls() for cls in (CrossEntropy, MeanSquaredError, BinaryCrossEntropy)}


def nothing_counted(loss: str | Loss, ignore_index: int) -> str:
    """The one-line message for data in which no prediction is counted.

    >>> nothing_counted("mse", -100)
    'every target is NaN (loss mse): no predictions to measure'
    """
    if get_loss(loss).name == "cross_entropy":
        return f"every label is ignore_index ({ignore_index}): no predictions to measure"
    return f"every target is NaN (loss {get_loss(loss).name}): no predictions to measure"


def get_loss(name: str | Loss) -> Loss:
    """The loss named ``name`` (or ``name`` itself); an unknown name raises GmixError listing the valid ones.

    >>> get_loss("mse").functional
    'F.mse_loss'
    >>> get_loss("hinge")
    Traceback (most recent call last):
    ...
    gmix_curvature.errors.GmixError: unknown loss 'hinge'; valid: cross_entropy, mse, bce
    """
    if isinstance(name, Loss):
        return name
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise GmixError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}") from None


class Predictions:
    """The predictions of one batch: the output as (N, P, K) (P predictions of width K per sample), the
    mask of counted ones, and the counted rows f (M, K) with their targets, sample and position indices.

    >>> pb = Predictions(get_loss("cross_entropy"), torch.zeros(2, 3, 5), torch.tensor([[1, -100, 4], [0, 2, -100]]))
    >>> pb.layout, (pb.n_samples, pb.positions, pb.width), pb.count, pb.sample.tolist(), pb.position.tolist()
    ('NdC', (2, 3, 5), 4, [0, 0, 1, 1], [0, 2, 0, 1])
    >>> tuple(pb.to_output(torch.ones(4, 5)).shape), float(pb.to_output(torch.ones(4, 5)).sum())
    ((2, 3, 5), 20.0)
    """

    def __init__(self, loss: str | Loss, out: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> None:
        self.loss = get_loss(loss)
        self.out_shape = out.shape
        if y.shape[:1] != out.shape[:1]:
            raise GmixError(f"labels of shape {_shape(y)} do not match the output {_shape(out)}: batch sizes differ")
        self.layout, self.positions, self.width = self.loss.rows_layout(out, y)
        self.n_samples = out.shape[0]
        npk = self.to_npk(out.detach())
        if isinstance(self.loss, CrossEntropy):
            labels = y.reshape(self.n_samples, self.positions, 1).long()  # uint8 masks (ignore 255), int32 ids
            self.mask = self.loss.counted(labels, ignore_index)
            t = labels[self.mask][:, 0]
        else:
            targets = y.detach().reshape(self.n_samples, self.positions, self.width)
            self.mask = self.loss.counted(targets, ignore_index)
            t = targets[self.mask].to(out.dtype)
        self.sample, self.position = self.mask.nonzero(as_tuple=True)
        self.f = npk[self.mask]
        self.t = t
        self.loss.check_targets(self.f, t)
        self.count = int(self.f.shape[0])
        self._stats: Any = None

    @property
    def stats(self) -> Any:
        """The loss's per-row statistics (softmax quantities for cross-entropy), computed once."""
        if self._stats is None:
            self._stats = self.loss.stats(self.f)
        return self._stats

    def to_npk(self, out: torch.Tensor) -> torch.Tensor:
        """An output-shaped tensor as (N, P, K)."""
        n = out.shape[0]
        if self.layout == "NCd":
            return out.reshape(n, self.width, self.positions).transpose(1, 2)
        return out.reshape(n, self.positions, self.width)

    def rows(self, out: torch.Tensor) -> torch.Tensor:
        """An output-shaped tensor's counted rows, (M, K)."""
        return self.to_npk(out)[self.mask]

    def to_output(self, rows: torch.Tensor) -> torch.Tensor:
        """Counted rows (M, K) scattered into an output-shaped tensor (zeros at ignored predictions)."""
        npk = rows.new_zeros(self.n_samples, self.positions, self.width)
        npk[self.mask] = rows
        if self.layout == "NCd":
            return npk.transpose(1, 2).reshape(self.out_shape)
        return npk.reshape(self.out_shape)
