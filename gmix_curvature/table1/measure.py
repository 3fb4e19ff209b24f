"""Measuring a trained run for Table 1 (the model in eval mode): :func:`measure_run` (accuracy, exact Tr(G) of
Eq. 5, the empirical-Fisher and Hessian traces, scale-invariant sharpness, λ_max, the stability thresholds of
:func:`stability_threshold`), Tr(G) at a matched training loss (:func:`matched_loss_trace`), the along-training
records, and the measured samples loaded back (:func:`table1_data`)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gmix_curvature.errors import GmixError
from gmix_curvature.optim import schedule_from_config
from gmix_curvature.optim.config import peak_lr
from gmix_curvature.table1.records import Table1Result, Table1Samples
from gmix_curvature.train import TrainConfig, evaluate

__all__ = ["stability_threshold", "measure_run", "matched_loss_trace", "table1_data", "read_trace", "annotate_trace"]


def stability_threshold(optimizer: str, lr: float, momentum: float) -> float:
    """The largest curvature λ at which the optimizer is stable on the quadratic ½λθ² at learning rate η.

    Heavy-ball momentum (``sgd``: v ← μv + g, θ ← θ − ηv) is stable iff ηλ < 2(1+μ); Nesterov's
    (``nesterov``) iff ηλ < 2(1+μ)/(1+2μ) — the "edge of stability" thresholds of Cohen et al. (2021,
    Appendix). Adaptive and layer-wise optimizers (adam, adamw, lars, lamb) precondition the step, so their
    threshold concerns the preconditioned Hessian and is not given here: NaN. Weight decay λ_wd adds
    λ_wd to the curvature of decayed weights (negligible at 5·10⁻⁴). A zero learning rate gives inf.

    >>> round(stability_threshold("sgd", 0.1, 0.9), 12)  # 2·1.9/0.1
    38.0
    >>> round(stability_threshold("nesterov", 0.1, 0.9), 4)
    13.5714
    >>> stability_threshold("lamb", 0.1, 0.9)
    nan
    """
    if lr < 0 or not 0 <= momentum < 1:
        raise GmixError(f"need lr >= 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
    if optimizer == "sgd":
        factor = 2 * (1 + momentum)
    elif optimizer == "nesterov":
        factor = 2 * (1 + momentum) / (1 + 2 * momentum)
    else:
        return math.nan
    return math.inf if lr == 0 else factor / lr



def table1_data(
    source: Table1Result | Mapping[str, Any] | str | Path, which: str = "measure", *, data_dir: str | None = None
) -> Any:
    """The samples a Table 1 run measured, loaded again: ``which`` = ``"measure"`` (the curvature columns, on the
    preset's measure split) or ``"eigen"`` (λ_max, on the training split). ``source`` is a :class:`Table1Result`,
    the dict of its ``table1.json``, or that file's path; ``data_dir`` defaults to the run's.

    >>> from gmix_curvature.data import load_dataset
    >>> saved = {"samples": {"measure": {"data": "digits", "split": "test", "seed": 0, "indices": [5, 2]}}}
    >>> ds = table1_data(saved)
    >>> len(ds), ds.y.tolist() == load_dataset("digits", "test").y[[5, 2]].tolist()
    (2, True)
    """
    if isinstance(source, Table1Result):
        samples, run_dir = source.samples, source.data_dir
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (expected a table1.json written by gmix table1)")
            source = json.loads(path.read_text())
        if not isinstance(source.get("samples"), Mapping):
            raise GmixError("this Table 1 record has no 'samples': it was written before the measured samples were "
                            "recorded; run gmix table1 again (finished runs are reused)")
        samples = {k: Table1Samples.from_dict(v) for k, v in source["samples"].items()}
        run_dir = source.get("data_dir")
    if which not in samples:
        raise GmixError(f"unknown samples {which!r}; valid: {', '.join(samples) or 'none recorded'}")
    return samples[which].load(data_dir if data_dir is not None else run_dir)


def measure_run(
    model: nn.Module,
    config: TrainConfig,
    *,
    measure_data: Any,
    train_data: Any,
    eigen_data: Any,
    hessian_probes: int = 32,
    eig_tol: float = 1e-4,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    generator_seed: int = 0,
    eigen: bool = True,
) -> dict[str, float]:
    """The measured columns of one trained ``model`` (left unchanged; a copy in ``dtype`` is measured in eval
    mode): on ``measure_data`` accuracy and loss, exact Tr(G) (Eq. 5) and its logs, the empirical-Fisher and
    Hessian traces, the scale-invariant sharpness; on ``train_data`` the training loss; on ``eigen_data``
    λ_max of G and of the Hessian (NaN when ``eigen`` is False, or the Hessian trace when ``hessian_probes``
    is 0); from the resolved ``config`` the peak and final learning rates and the
    stability thresholds (:func:`stability_threshold`). Data are data sets (``.tensors()``).

    >>> from gmix_curvature.data import load_dataset
    >>> from gmix_curvature.models import build_model
    >>> from gmix_curvature.train import resolve_config
    >>> ds = load_dataset("digits", "test").subset(32)
    >>> net = build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8), width=4).eval()
    >>> cfg = resolve_config(TrainConfig(steps=10, batch_size=64), 100)
    >>> m = measure_run(net, cfg, measure_data=ds, train_data=ds, eigen_data=ds, hessian_probes=2, eigen=False)
    >>> round(m["threshold_peak"], 12), abs(m["abs_log_ggn_trace"] - abs(math.log(m["ggn_trace"]))) < 1e-12
    (38.0, True)
    """
    from gmix_curvature.curvature import (
        empirical_fisher_trace,
        ggn_trace,
        hessian_trace,
        scale_invariant_sharpness,
        top_eigenvalues,
    )

    device = next(model.parameters()).device
    net = _copy_model(model).to(dtype=dtype).eval()
    kw = {"batch_size": batch_size}

    def pair(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ds.tensors()
        return x.to(device=device, dtype=dtype), y.to(device)

    m: dict[str, float] = {}
    ev = evaluate(net, measure_data, device=device, dtype=dtype)
    m["test_acc"], m["test_loss"] = 100 * ev["acc"], ev["loss"]
    data = pair(measure_data)
    try:
        si = scale_invariant_sharpness(net, data, method="exact", **kw)
        m["ggn_trace"] = float(si.extra["ggn_trace"])
        m["si_sharpness"] = float(si.value)
        m["si_weight_norm2"] = float(sum(si.extra["weight_norms2"].values()))
    except GmixError as exc:
        if "scale-invariant" not in str(exc):
            raise
        m["ggn_trace"] = float(ggn_trace(net, data, "exact", **kw).value)
        m["si_sharpness"] = m["si_weight_norm2"] = math.nan
    m["log_ggn_trace"] = math.log(m["ggn_trace"]) if m["ggn_trace"] > 0 else math.nan
    m["abs_log_ggn_trace"] = abs(m["log_ggn_trace"])
    m["ef_trace"] = float(empirical_fisher_trace(net, data, **kw).value)
    m["hessian_trace"] = m["hessian_trace_stderr"] = math.nan
    if hessian_probes > 0:
        h = hessian_trace(net, data, num_probes=hessian_probes, generator=generator_seed, **kw)
        m["hessian_trace"], m["hessian_trace_stderr"] = float(h.value), float(h.stderr or math.nan)
    ev = evaluate(net, train_data, device=device, dtype=dtype)
    m["train_loss"], m["train_acc"] = ev["loss"], 100 * ev["acc"]
    for matrix in ("ggn", "hessian"):
        m[f"lambda_max_{matrix}"] = math.nan
        if eigen:
            r = top_eigenvalues(net, pair(eigen_data), 1, matrix=matrix, tol=eig_tol, generator=generator_seed, **kw)
            m[f"lambda_max_{matrix}"] = float(r.value)
    lr_fn = schedule_from_config(config, int(config.steps))
    m["lr_peak"] = float(peak_lr(config))
    m["lr_final"] = float(lr_fn(int(config.steps) - 1))
    m["threshold_peak"] = stability_threshold(config.optimizer, m["lr_peak"], config.momentum)
    m["threshold_final"] = stability_threshold(config.optimizer, m["lr_final"], config.momentum)
    return m


def _copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def matched_loss_trace(traces: Mapping[Any, Sequence[Mapping[str, float]]]) -> tuple[float | None, dict[Any, float]]:
    """Tr(G) of every run at one training loss L* that all of them reached: L* is the largest of the runs'
    lowest recorded losses, and each run's Tr(G) is read where its loss first fell to L*, interpolating
    log Tr(G) linearly in log loss between the two records around the crossing. ``traces`` maps a run to
    its records (``loss`` and ``ggn_trace``, in training order). Returns (L*, {run: Tr(G) at L*}).

    >>> t = {"a": [{"loss": 2.0, "ggn_trace": 1.0}, {"loss": 0.5, "ggn_trace": 4.0}],
    ...      "b": [{"loss": 2.0, "ggn_trace": 2.0}, {"loss": 1.0, "ggn_trace": 8.0}]}
    >>> level, at = matched_loss_trace(t)
    >>> level, round(at["a"], 12), round(at["b"], 12)
    (1.0, 2.0, 8.0)
    """
    clean = {
        k: [(float(r["loss"]), float(r["ggn_trace"])) for r in recs
            if math.isfinite(r.get("loss", math.nan)) and r.get("ggn_trace", math.nan) > 0 and r["loss"] > 0]
        for k, recs in traces.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return None, {}
    level = max(min(loss for loss, _ in v) for v in clean.values())
    out: dict[Any, float] = {}
    for k, recs in clean.items():
        prev = None
        for loss, tr in recs:
            if loss <= level:
                if prev is None or prev[0] <= loss:
                    out[k] = tr
                else:
                    w = (math.log(prev[0]) - math.log(level)) / (math.log(prev[0]) - math.log(loss))
                    out[k] = math.exp((1 - w) * math.log(prev[1]) + w * math.log(tr))
                break
            prev = (loss, tr)
    return level, out



def read_trace(out: str | None) -> list[dict[str, float]]:
    if out is None:
        return []
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "trace":
            recs.append({k: v for k, v in rec.items() if isinstance(v, int | float)})
    return recs


def annotate_trace(trace: list[dict[str, float]], config: TrainConfig) -> list[dict[str, float]]:
    """Add to each along-training record the learning rate of its step (``lr``: the rate of the next optimizer
    step, the last one's at the end) and ``edge_ratio`` = λ_max(G) / :func:`stability_threshold` at that rate."""
    lr_fn = schedule_from_config(config, int(config.steps))
    for rec in trace:
        step = min(int(rec.get("step", 0)), int(config.steps) - 1)
        rec["lr"] = float(lr_fn(step))
        thr = stability_threshold(config.optimizer, rec["lr"], config.momentum)
        rec["edge_ratio"] = rec.get("top_eigenvalue", math.nan) / thr if thr > 0 else math.nan
    return trace


