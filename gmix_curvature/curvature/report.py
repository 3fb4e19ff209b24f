"""Curvature of a checkpoint, as ``gmix trace`` reports it: load the model (a ``gmix train`` checkpoint, a
plain state_dict with its architecture named, or a saved module), load the data, run the methods, and
return a JSON-ready report. Under ``torchrun`` the data is sharded over the ranks (see ``_data``)."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gmix_curvature.checkpoint import load_checkpoint
from gmix_curvature.curvature._result import CONVENTION, CurvatureResult, EstimatorWarning
from gmix_curvature.curvature.empirical import empirical_fisher_trace
from gmix_curvature.curvature.ggn import GGNMethod, ggn_trace
from gmix_curvature.curvature.hessian import hessian_trace
from gmix_curvature.data import load_dataset
from gmix_curvature.errors import CheckpointError, GmixError

__all__ = ["TRACE_METHODS", "TraceReport", "trace_checkpoint", "format_table"]

TRACE_METHODS = tuple(m.value for m in GGNMethod) + ("empirical_fisher", "hessian", "all")
_ALL = ("exact", "fisher_is", "output_hutchinson", "hutchinson", "fisher_mc", "empirical_fisher", "hessian")


@dataclass
class TraceReport:
    """What ``gmix trace`` measured: the results (one per method), where the model and data came from."""

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
    trust: bool = False,
) -> TraceReport:
    """Measure the curvature of a checkpoint on ``samples`` samples of a data split (a random subset drawn
    with ``seed``; all of it with ``samples=None``). ``data`` defaults to the checkpoint's own data set.
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
    >>> report.results[0].method, report.results[0].n_samples, report.data["name"]
    ('exact', 64, 'digits')
    """
    methods = _methods(method)
    if samples is not None and samples < 1:
        raise GmixError(f"--samples must be >= 1, got {samples}")
    net, config = load_checkpoint(
        checkpoint, model=model, num_classes=num_classes, input_shape=input_shape, model_kwargs=model_kwargs,
        trust=trust,
    )
    name = data or config.get("data")
    if name is None:
        raise GmixError(f"{checkpoint} does not say which data it was trained on: name it with --data")
    ds = load_dataset(name, split, data_dir if data_dir is not None else config.get("data_dir"))
    if samples is not None:
        ds = ds.subset(samples, torch.Generator().manual_seed(seed))
    x, y = ds.tensors()
    if len(y) == 0:
        raise GmixError(f"the {name} {split} split is empty")
    net = net.to(device)
    with torch.no_grad():
        try:
            out = net.eval()(x[:2].to(device))
        except RuntimeError as exc:
            msg = " ".join(str(exc).split())[:200]
            shape = tuple(x.shape[1:])
            raise CheckpointError(f"the model of {checkpoint} does not accept {name} inputs {shape}: {msg}") from None
    if out.ndim != 2:
        raise CheckpointError(f"the model of {checkpoint} outputs shape {tuple(out.shape)}, not (batch, classes)")
    if int(y.max()) >= out.shape[1]:
        raise GmixError(
            f"labels out of range: {name} has labels up to {int(y.max())} but the model has {out.shape[1]} outputs"
        )
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    report = TraceReport(
        str(checkpoint), {k: v for k, v in config.items() if isinstance(v, str | int | float | list | dict | None)},
        {"name": name, "split": split, "samples": len(y), "batch_size": batch_size, "seed": seed},
    )
    gen = torch.Generator().manual_seed(seed)
    for m in methods:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", EstimatorWarning)
            if m == "empirical_fisher":
                r = empirical_fisher_trace(net, batches, bn_mode=bn_mode, progress=progress)
            elif m == "hessian":
                r = hessian_trace(net, batches, num_probes=num_probes or 16, generator=gen,
                                  target_rel_stderr=target_rel_stderr, bn_mode=bn_mode, progress=progress)
            else:
                r = ggn_trace(net, batches, m, num_probes=num_probes, generator=gen,
                              target_rel_stderr=target_rel_stderr, bn_mode=bn_mode, progress=progress)
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
