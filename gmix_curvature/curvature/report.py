"""Curvature of a checkpoint, as ``gmix trace`` reports it: load the model (a ``gmix train`` checkpoint, a
plain state_dict with its architecture named, or a saved module), load the data (every data set ``gmix train``
reads: a random subset drawn without loading the rest), run the methods, and return a JSON-ready report.
Under ``torchrun`` the data is sharded over the ranks (see ``_data``).

Outputs may be (N, C) logits, (N, T, C) sequence logits with (N, T) token labels (padding marked by
``ignore_index``: Multi30k's ``<pad>`` by default) or the (N, C, d1, ...) layout of ``F.cross_entropy``; the
loss is ``cross_entropy``, ``mse`` or ``bce`` (integer class labels become one-hot targets for the latter two).
G is the mean over the n counted predictions (see ``CONVENTION``); the report records n.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gmix_curvature.checkpoint import load_checkpoint
from gmix_curvature.curvature._loss import LOSSES, nothing_counted
from gmix_curvature.curvature._outputs import OutputFn, predictions
from gmix_curvature.curvature._result import CONVENTION, CurvatureResult, EstimatorWarning
from gmix_curvature.curvature.empirical import empirical_fisher_trace
from gmix_curvature.curvature.ggn import GGNMethod, ggn_trace
from gmix_curvature.curvature.hessian import hessian_trace
from gmix_curvature.data import DATASETS, load_dataset
from gmix_curvature.errors import CheckpointError, GmixError

__all__ = [
    "TRACE_METHODS",
    "TRACE_LOSSES",
    "TraceReport",
    "EvalBatches",
    "trace_checkpoint",
    "load_trace_data",
    "format_table",
]

TRACE_METHODS = tuple(m.value for m in GGNMethod) + ("empirical_fisher", "hessian", "all")
TRACE_LOSSES = tuple(LOSSES)  # cross_entropy, mse, bce
_ALL = ("exact", "fisher_is", "output_hutchinson", "hutchinson", "fisher_mc", "empirical_fisher", "hessian")
_IMAGE_FOLDERS = ("imagenet", "imagefolder")
CACHE_BYTES = 2**29  # decoded evaluation batches up to 512 MiB are kept between passes; larger sets re-decode


@dataclass
class TraceReport:
    """What ``gmix trace`` measured: the results (one per method), where the model and data came from, the
    loss and the number of counted predictions n that G is the mean over (``data["n_predictions"]``)."""

    checkpoint: str
    config: dict[str, Any]
    data: dict[str, Any]
    results: list[CurvatureResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    convention: str = CONVENTION

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint, "config": self.config, "data": self.data, "convention": self.convention,
            "warnings": self.warnings, "results": [r.to_dict() for r in self.results],
        }  # fmt: skip


def _methods(method: str) -> Sequence[str]:
    if method not in TRACE_METHODS:
        raise GmixError(f"unknown method {method!r}; valid: {', '.join(TRACE_METHODS)}")
    return _ALL if method == "all" else (method,)


def _check_loss(loss: str) -> str:
    if loss not in TRACE_LOSSES:
        raise GmixError(f"unknown loss {loss!r}; valid: {', '.join(TRACE_LOSSES)}")
    return loss


def load_trace_data(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Any:
    """A random subset of ``samples`` samples (all with ``None``) of a data split, drawn with ``seed``, for
    evaluation: any data set of :data:`gmix_curvature.data.DATASETS`. ImageFolder trees and Multi30k are
    subset before anything is decoded; ``image_size`` sets the evaluation crop of ImageFolder images.

    >>> ds = load_trace_data("digits", "test", samples=5, seed=1)
    >>> len(ds), ds.get_batch(torch.arange(5))[0].shape
    (5, torch.Size([5, 1, 8, 8]))
    """
    if name not in DATASETS:
        raise GmixError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    if samples is not None and samples < 1:
        raise GmixError(f"--samples must be >= 1, got {samples}")
    if name in _IMAGE_FOLDERS and image_size is not None:
        from gmix_curvature.data_large import LARGE_DATASETS

        ds = LARGE_DATASETS[name](split, data_dir, image_size=int(image_size))
    else:
        ds = load_dataset(name, split, data_dir)
    if len(ds) == 0:
        raise GmixError(f"the {name} {split} split is empty")
    return ds.subset(samples, torch.Generator().manual_seed(seed)) if samples is not None else ds


class EvalBatches:
    """The (x, y) batches of a data set in evaluation mode (``get_batch`` without augmentation), in order:
    a re-iterable for the estimators. Batches are decoded once and kept when the whole set fits in
    ``cache_bytes`` (as float32), else decoded again on every pass (ImageNet-sized subsets).
    ``transform(x, y) -> (x, y)``, settable later, is applied to each batch as it is read (e.g. one-hot targets)."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        cache_bytes: int = CACHE_BYTES,
        transform: Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]] | None = None,
    ) -> None:
        if batch_size < 1:
            raise GmixError(f"--batch-size must be >= 1, got {batch_size}")
        self.dataset, self.transform = dataset, transform
        self.chunks = torch.arange(len(dataset)).split(batch_size)
        size = len(dataset) * math.prod(getattr(dataset, "input_shape", ())) * 4
        self._cache = [dataset.get_batch(c) for c in self.chunks] if size <= cache_bytes else None

    def _apply(self, x: Any, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        return self.transform(x, y) if self.transform is not None else (x, y)

    def probe(self) -> tuple[Any, torch.Tensor]:
        """The first two samples as the first batch holds them (the same padding), untransformed."""
        x, y = self._cache[0] if self._cache is not None else self.dataset.get_batch(self.chunks[0][:2])
        return _head(x, 2), y[:2]

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for i, c in enumerate(self.chunks):
            yield self._apply(*(self._cache[i] if self._cache is not None else self.dataset.get_batch(c)))

    def labels(self) -> Iterator[torch.Tensor]:
        """The label tensor of each batch (without decoding images where the data set holds its labels)."""
        if self._cache is not None or not isinstance(getattr(self.dataset, "y", None), torch.Tensor):
            for _, y in self:
                yield y
        else:
            for c in self.chunks:
                yield self._apply(None, self.dataset.y[c])[1]


def estimator_options(
    *, loss: str = "cross_entropy", ignore_index: int = -100, output_fn: OutputFn | None = None
) -> dict[str, Any]:
    """The keyword arguments that pass ``loss``, ``ignore_index`` and ``output_fn`` on to every estimator."""
    return {"loss": _check_loss(loss), "ignore_index": int(ignore_index), "output_fn": output_fn}


def _head(x: Any, k: int) -> Any:
    return {key: v[:k] for key, v in x.items()} if isinstance(x, Mapping) else x[:k]


def _to(x: Any, device: str | torch.device) -> Any:
    return {key: v.to(device) for key, v in x.items()} if isinstance(x, Mapping) else x.to(device)


def _class_dim(out: torch.Tensor, y: torch.Tensor) -> int:
    """Where the classes lie for class labels ``y``: dim 1 of (N, C) or (N, C, d1, ...), dim -1 of (N, T, C)."""
    if out.ndim == y.ndim + 1:
        if out.ndim >= 3 and tuple(y.shape[1:]) == tuple(out.shape[1:-1]):
            return out.ndim - 1
        if tuple(y.shape[1:]) == tuple(out.shape[2:]):
            return 1
    raise GmixError(
        f"labels of shape {tuple(y.shape)} do not match outputs of shape {tuple(out.shape)}: class labels need "
        "(N,) for (N, C) logits, (N, T) for (N, T, C) or (N, d1, ...) for (N, C, d1, ...)"
    )


def _one_hot(num_classes: int) -> Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]]:
    def transform(x: Any, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if y.dtype.is_floating_point:
            return x, y
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise GmixError(f"labels out of range: found {int(y.min())}..{int(y.max())} for {num_classes} outputs")
        return x, F.one_hot(y, num_classes).to(torch.float32)

    return transform


def count_predictions(out: torch.Tensor, batches: EvalBatches, loss: str, ignore_index: int) -> int:
    """Check every batch's targets against the model's output ``out`` (on the first batch) and return n, the
    number of counted predictions: labels that are not ``ignore_index`` (cross-entropy), output vectors
    (``mse``: F.mse_loss averages over the last dimension), output elements (``bce``); NaN float targets are
    not counted (a partly NaN output vector is refused by the estimators)."""
    n = 0
    first = True
    for y in batches.labels():
        if loss == "cross_entropy":
            if y.dtype.is_floating_point or y.dtype == torch.bool:
                raise GmixError(f"cross_entropy needs integer class labels, got {y.dtype}: use --loss mse or bce")
            if first:
                num_classes = int(out.shape[_class_dim(out, y[: out.shape[0]])])
            counted = y[y != ignore_index]
            if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= num_classes):
                raise GmixError(
                    f"labels out of range: found labels {int(counted.min())}..{int(counted.max())} (ignore_index "
                    f"{ignore_index} aside) for a model with {num_classes} classes (vocabulary)"
                )
            n += int(counted.numel())
        else:
            if first and tuple(y.shape[1:]) != tuple(out.shape[1:]):
                raise GmixError(
                    f"{loss} targets of shape {tuple(y.shape)} do not match outputs of shape {tuple(out.shape)}"
                )
            known = y[~torch.isnan(y)]  # NaN: a prediction that is not counted
            if loss == "bce" and known.numel() and (float(known.min()) < 0 or float(known.max()) > 1):
                raise GmixError("bce targets must lie in [0, 1]")
            n += int(known.numel() // (y.shape[-1] if loss == "mse" and y.ndim > 1 else 1))
        first = False
    if n == 0:
        raise GmixError(nothing_counted(loss, ignore_index))
    return n


def _image_size(name: str, input_shape: Sequence[int] | None, config: Mapping[str, Any]) -> int | None:
    """The evaluation crop for an ImageFolder: the model's input size when known (not a state_dict's default)."""
    if name not in _IMAGE_FOLDERS:
        return None
    shape = input_shape if input_shape is not None else (
        config.get("input_shape") if config.get("source") != "state_dict" else None
    )  # fmt: skip
    return int(shape[-1]) if shape is not None and len(shape) == 3 else None


def trace_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    method: str = "auto",
    data: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    samples: int | None = 1024,
    batch_size: int = 128,
    num_probes: int | None = None,
    target_rel_stderr: float | None = None,
    seed: int = 0,
    bn_mode: str = "eval",
    model: str | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = False,
    loss: str = "cross_entropy",
    ignore_index: int | None = None,
    output_fn: OutputFn | None = None,
    trust: bool = False,
) -> TraceReport:
    """Measure the curvature of a checkpoint on ``samples`` samples of a data split (a random subset drawn
    with ``seed``; all of it with ``samples=None``). ``data`` defaults to the checkpoint's own data set.

    Tr(G) is Eq. 5 generalised to several predictions per sample: the mean over the n counted predictions
    of J_tᵀ H_t J_t with H_t the Hessian of ``loss`` in the logits. ``ignore_index`` (default: the data
    set's padding label, Multi30k's ``<pad>``, else -100) marks labels that do not count; ``output_fn``
    picks the logits out of what the model returns (default: tensor, tuple[0], ``["logits"]``, ``.logits``).
    ``trust=True`` unpickles a checkpoint that needs it in full (a pickled module), which runs code it names
    (see :func:`gmix_curvature.checkpoint.read_checkpoint`); without it such a file is refused.

    >>> import tempfile, os
    >>> from gmix_curvature.checkpoint import save_checkpoint
    >>> from gmix_curvature.models import build_model
    >>> net = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[8])
    >>> cfg = {"model": "mlp", "model_kwargs": {"hidden": [8]}, "num_classes": 10, "input_shape": [1, 8, 8],
    ...        "data": "digits", "data_dir": None}
    >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
    >>> _ = save_checkpoint({"format": "gmix-checkpoint", "model": net.state_dict(), "config": cfg}, path)
    >>> report = trace_checkpoint(path, method="exact", samples=64)
    >>> report.results[0].method, report.results[0].n_samples, report.data["name"], report.data["n_predictions"]
    ('exact', 64, 'digits', 64)
    """
    methods = _methods(method)
    loss = _check_loss(loss)
    if samples is not None and samples < 1:
        raise GmixError(f"--samples must be >= 1, got {samples}")
    net, config = load_checkpoint(
        checkpoint, model=model, num_classes=num_classes, input_shape=input_shape, model_kwargs=model_kwargs,
        trust=trust,
    )
    name = data or config.get("data")
    if name is None:
        raise GmixError(f"{checkpoint} does not say which data it was trained on: name it with --data")
    ds_dir = data_dir if data_dir is not None else config.get("data_dir")
    ds = load_trace_data(name, split, ds_dir, samples=samples, seed=seed,
                         image_size=_image_size(name, input_shape, config))  # fmt: skip
    if ignore_index is None:
        ignore_index = int(getattr(ds, "ignore_index", -100))
    vocab = config.get("num_classes")
    if hasattr(ds, "tokenizer") and vocab is not None and int(vocab) != ds.num_classes:
        raise GmixError(f"the {name} vocabulary built from the training text of {ds_dir} has {ds.num_classes} "
                        f"tokens but the model's has {vocab}: use the --data-dir it was trained on")  # fmt: skip
    net = net.to(device)
    batches = EvalBatches(ds, batch_size)
    x0, y0 = batches.probe()
    with torch.no_grad():
        try:
            out = predictions(net.eval(), _to(x0, device), output_fn)
        except (RuntimeError, IndexError) as exc:
            msg = " ".join(str(exc).split())[:200]
            shape = tuple(x0.shape[1:]) if isinstance(x0, torch.Tensor) else sorted(x0)
            raise CheckpointError(f"the model of {checkpoint} does not accept {name} inputs {shape}: {msg}") from None
    if not torch.isfinite(out).all():
        raise GmixError(f"the model of {checkpoint} outputs non-finite logits (NaN or inf) on {name}")
    transform = None
    if loss != "cross_entropy" and not y0.dtype.is_floating_point:  # class labels: one-hot targets
        if out.ndim != 2:
            raise GmixError(f"--loss {loss} with class labels needs (batch, classes) outputs, got {tuple(out.shape)}")
        batches.transform = transform = _one_hot(int(out.shape[1]))
    n_predictions = count_predictions(out, batches, loss, ignore_index)
    report = TraceReport(
        str(checkpoint), {k: v for k, v in config.items() if isinstance(v, str | int | float | list | dict | None)},
        {"name": name, "split": split, "samples": len(ds), "batch_size": batch_size, "seed": seed, "loss": loss,
         "ignore_index": ignore_index, "n_predictions": n_predictions,
         "targets": "one-hot class labels" if transform is not None else "labels"},
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    kw = estimator_options(loss=loss, ignore_index=ignore_index, output_fn=output_fn)
    for m in methods:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EstimatorWarning)
            if m == "empirical_fisher":
                r = empirical_fisher_trace(net, batches, bn_mode=bn_mode, progress=progress, **kw)
            elif m == "hessian":
                r = hessian_trace(net, batches, num_probes=num_probes or 16, generator=gen,
                                  target_rel_stderr=target_rel_stderr, bn_mode=bn_mode, progress=progress, **kw)
            else:
                r = ggn_trace(net, batches, m, num_probes=num_probes, generator=gen,
                              target_rel_stderr=target_rel_stderr, bn_mode=bn_mode, progress=progress, **kw)
        report.warnings += [str(w.message) for w in caught if issubclass(w.category, EstimatorWarning)]
        r.seconds = time.perf_counter() - start
        report.results.append(r)
    return report


def format_table(report: TraceReport) -> str:
    """The report as a text table: method, Tr, ± stderr, |log Tr| (Table 1's column), seconds."""
    lines = [f"{'method':<18} {'quantity':<22} {'Tr':>12} {'± stderr':>11} {'|log Tr|':>9} {'probes':>6} {'s':>7}"]
    for r in report.results:
        se = "exact" if r.stderr is None and r.n_probes == 0 else ("-" if r.stderr is None else f"{r.stderr:.4g}")
        log_abs = f"{r.log_abs:.3f}" if not math.isnan(r.log_abs) else "nan"
        lines.append(
            f"{r.method:<18} {r.quantity:<22} {r.value:>12.6g} {se:>11} {log_abs:>9} {r.n_probes:>6} {r.seconds:>7.2f}"
        )
    return "\n".join(lines)
