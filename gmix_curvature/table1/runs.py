"""Running Table 1: κ selection on fit/val (:func:`select_kappa`), every method × seed trained through
:func:`gmix_curvature.train.train` and measured (:func:`~gmix_curvature.table1.measure.measure_run`), then the
summary, the paired comparisons and the verdicts (:func:`run_table1`).

Every run of one seed shares the initialisation (``torch.manual_seed(seed)`` before the model is built) and the
data order (epoch permutations seeded from the seed alone): the noise of GradientMix draws from its own
generator, so rows of one seed differ only in what the method changes — the comparisons are paired by seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmix_curvature.data import load_dataset
from gmix_curvature.distributed import init_distributed
from gmix_curvature.errors import GmixError, TrainingDiverged
from gmix_curvature.table1.measure import annotate_trace, matched_loss_trace, measure_run, read_trace
from gmix_curvature.table1.methods import METHOD, TABLE1_METHODS
from gmix_curvature.table1.presets import Table1Preset, table1_preset
from gmix_curvature.table1.records import KappaSelection, RunRecord, Table1Result, Table1Samples
from gmix_curvature.table1.summary import paired_comparisons, summarise
from gmix_curvature.table1.verdict import judge_claims
from gmix_curvature.train import TrainConfig, evaluate, resolve_config, train

__all__ = ["run_table1", "select_kappa", "cpu_threads", "run_config"]


def _log(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


def run_config(
    preset: Table1Preset,
    *,
    noise: str,
    batch_size: int,
    kappa_ratio: float,
    seed: int,
    out: Path | None,
    num_train: int,
    max_steps: int | None,
    device: str,
    progress: bool,
    trace: bool,
    splits: tuple[str, str] | None = None,
) -> TrainConfig:
    values = dict(preset.train)
    values.update(
        batch_size=batch_size,
        noise=noise,
        kappa=None,
        kappa_ratio=kappa_ratio if noise != "none" else None,
        seed=seed,
        out=str(out) if out is not None else None,
        device=device,
        progress=progress,
        trace_every=0,
        trace_samples=preset.trace_samples,
        trace_method="exact",
    )
    if splits is not None:
        values["train_split"], values["eval_split"] = splits
    cfg = TrainConfig.from_dict(values)
    steps = int(resolve_config(cfg, num_train).steps)
    if max_steps is not None:
        if max_steps < 1:
            raise GmixError(f"max_steps must be >= 1, got {max_steps}")
        steps = min(steps, max_steps)
        cfg = dataclasses.replace(cfg, steps=steps, epochs=None)
    if trace and preset.trace_points > 0:
        cfg = dataclasses.replace(cfg, trace_every=max(1, steps // preset.trace_points))
    return cfg


def _train_run(cfg: TrainConfig, datasets: tuple[Any, Any], trust: bool = False) -> Any:
    """Train, continuing from the run's checkpoint when one is there (a finished run returns at once; ``trust``:
    a checkpoint that needs full unpickling is read, see :mod:`gmix_curvature.checkpoint`)."""
    resume = cfg.out is not None and (Path(cfg.out) / "checkpoint.pt").exists()
    return train(cfg, resume=resume, datasets=datasets, trust=trust)



def _checkpoint_digest(run_out: Path) -> str:
    h = hashlib.sha256()
    with open(run_out / "checkpoint.pt", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _measured(run_out: Path | None, key: dict[str, Any], measure: Callable[[], dict[str, float]],
              is_main: bool = True) -> dict[str, float]:
    """``measure()``, or the metrics ``run_out/table1_measure.json`` holds for the same ``key`` (the checkpoint's
    SHA-256 and every measurement setting): a rerun in a finished directory measures nothing twice. Written
    atomically (rank 0 only)."""
    if run_out is None or not (run_out / "checkpoint.pt").is_file():
        return measure()
    key = {**key, "checkpoint_sha256": _checkpoint_digest(run_out)}
    path = run_out / "table1_measure.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return {k: float(v) for k, v in saved["metrics"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            pass  # unreadable: measure again and replace it
    metrics = measure()
    if is_main:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1) + "\n")
        os.replace(tmp, path)
    return metrics


def _train_and_measure(
    p: Table1Preset, method_key: str, seed: int, ratios: dict[str, float], *, root: Path | None,
    datasets: tuple[Any, Any], measure_ds: Any, eigen_ds: Any, samples: dict[str, Table1Samples],
    max_steps: int | None, device: str, progress: bool, log: Callable[[str], None] | None, trust: bool = False,
    is_main: bool = True,
) -> RunRecord:
    """One row × seed: train (or continue, or reuse the finished checkpoint), measure (or reuse the measurement
    recorded for this checkpoint and these settings), read the along-training records."""
    method = METHOD[method_key]
    batch = p.small_batch_size if method.small_batch else p.batch_size
    run_out = root / f"{method.key}-seed{seed}" if root is not None else None
    cfg = run_config(
        p, noise=method.noise, batch_size=batch, kappa_ratio=ratios.get(method.noise, 0.0), seed=seed, out=run_out,
        num_train=len(datasets[0]), max_steps=max_steps, device=device, progress=progress, trace=True,
    )
    t0 = time.perf_counter()
    res = _train_run(cfg, datasets, trust)
    t1 = time.perf_counter()
    dtype = torch.float64 if p.measure_dtype == "float64" else torch.float32
    settings = {"version": 1, "measure": samples["measure"].to_dict(), "eigen": samples["eigen"].to_dict(),
                "hessian_probes": p.hessian_probes, "eig_tol": p.eig_tol, "batch_size": p.measure_batch_size,
                "dtype": p.measure_dtype, "generator_seed": seed, "eigen_measured": p.eigen_samples != 0}
    metrics = _measured(run_out, settings, lambda: measure_run(
        res.model, res.config, measure_data=measure_ds, train_data=datasets[0], eigen_data=eigen_ds,
        hessian_probes=p.hessian_probes, eig_tol=p.eig_tol, batch_size=p.measure_batch_size, dtype=dtype,
        generator_seed=seed, eigen=p.eigen_samples != 0,
    ), is_main)
    rec = RunRecord(
        method=method.key, seed=seed, batch_size=batch, noise=method.noise,
        kappa_ratio=float(res.config.kappa_ratio), kappa=float(res.config.kappa), steps=int(res.steps),
        out=str(run_out) if run_out else None,
        metrics=metrics, trace=annotate_trace(read_trace(str(run_out) if run_out else None), res.config),
    )
    ratios_along = [t["edge_ratio"] for t in rec.trace if math.isfinite(t.get("edge_ratio", math.nan))]
    rec.metrics["edge_ratio_max"] = max(ratios_along) if ratios_along else math.nan
    _log(
        log,
        f"{method.key} seed={seed}: {res.steps} steps in {t1 - t0:.1f}s, measured in "
        f"{time.perf_counter() - t1:.1f}s; test acc {metrics['test_acc']:.2f}%, Tr(G) {metrics['ggn_trace']:.4g}",
    )
    return rec


def _selection_rule() -> str:
    return (
        "per noise kind, the r with the highest mean validation accuracy over the selection seeds; ties to the "
        "lower mean validation loss, then to the smaller r; a diverged run scores accuracy 0 and loss inf"
    )


def select_kappa(
    preset: str | Table1Preset,
    *,
    noises: Sequence[str] = ("gaussian", "rademacher"),
    out: str | Path | None = None,
    data_dir: str | None = None,
    max_steps: int | None = None,
    device: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    trust: bool = False,
) -> KappaSelection:
    """Choose r = κ·B (Eq. 12 with κ in units of the mean weight 1/B) for each noise kind without looking at
    the test split: train at the preset's large batch on ``select_splits[0]`` (``fit``) for every candidate
    r of ``kappa_sweep`` and ``select_seeds`` seeds, score on ``select_splits[1]`` (``val``), and apply the
    rule of :func:`_selection_rule`. The averaging baseline is trained and scored too, for reference only.

    >>> quick = dataclasses.replace(table1_preset("micro"), kappa_sweep=(1.0, 3.0))
    >>> sel = select_kappa(quick, noises=["gaussian"])
    >>> sel.splits, sel.chosen["gaussian"] in (1.0, 3.0), len(sel.scores)  # 1 baseline + 2 candidates
    (('fit', 'val'), True, 3)
    """
    p = table1_preset(preset)
    if not p.kappa_sweep:
        raise GmixError(f"preset {p.name!r} has no kappa sweep; give kappa or kappa_ratio")
    with cpu_threads(p.threads):
        return _select_kappa(p, noises, out, data_dir, max_steps, device, progress, log, trust)


def _select_kappa(p, noises, out, data_dir, max_steps, device, progress, log, trust=False) -> KappaSelection:
    data = p.train.get("data", "digits")
    fit, val = (load_dataset(data, s, data_dir) for s in p.select_splits)
    ctx = init_distributed(device)
    root = Path(out) if out is not None else None
    scores: list[dict[str, Any]] = []
    cells = [("none", 0.0)] + [(nz, r) for nz in noises for r in p.kappa_sweep]
    for noise, r in cells:
        for seed in range(p.select_seeds):
            run_out = root / f"{noise}-r{r:g}-seed{seed}" if root is not None else None
            cfg = run_config(
                p, noise=noise, batch_size=p.batch_size, kappa_ratio=r, seed=seed, out=run_out, num_train=len(fit),
                max_steps=max_steps, device=device, progress=progress, trace=False, splits=p.select_splits,
            )
            try:
                res = _train_run(cfg, (fit, val), trust)
                ev = evaluate(res.model, val, device=ctx.device, ctx=ctx)
                acc, loss = ev["acc"], ev["loss"]
            except TrainingDiverged:
                acc, loss = 0.0, math.inf
            scores.append({"noise": noise, "kappa_ratio": r, "seed": seed, "val_acc": acc, "val_loss": loss})
            _log(log, f"select {noise} r={r:g} seed={seed}: val acc {100 * acc:.2f}%, val loss {loss:.4f}")
    chosen = {}
    for noise in noises:
        best = None
        for r in p.kappa_sweep:
            mine = [s for s in scores if s["noise"] == noise and s["kappa_ratio"] == r]
            acc = float(np.mean([s["val_acc"] for s in mine]))
            loss = float(np.mean([s["val_loss"] for s in mine]))
            key = (-acc, loss, r)
            if best is None or key < best[0]:
                best = (key, r)
        chosen[noise] = best[1]
    return KappaSelection(_selection_rule(), tuple(p.select_splits), p.batch_size, tuple(p.kappa_sweep), scores,
                          chosen)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count (None or 0: unchanged).

    >>> before = torch.get_num_threads()
    >>> with cpu_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if not n:
        yield
        return
    if not isinstance(n, int) or n < 0:
        raise GmixError(f"threads must be an integer >= 0, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_table1(
    preset: str | Table1Preset = "tiny",
    *,
    seeds: int | None = None,
    kappa: float | None = None,
    kappa_ratio: float | None = None,
    out: str | Path | None = None,
    data_dir: str | None = None,
    max_steps: int | None = None,
    device: str = "auto",
    progress: bool = False,
    plot: bool = True,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
    measure_samples: int | None = None,
    eigen_samples: int | None = None,
    hessian_probes: int | None = None,
    trace_points: int | None = None,
    trust: bool = False,
) -> Table1Result:
    """Run Table 1 end to end (see the module docstring) and return a :class:`Table1Result`.

    ``seeds`` overrides the preset's number of seeds (0..seeds-1, shared by all rows, so runs of one seed
    start from the same initialisation and data order). ``kappa`` (κ at the large batch) or ``kappa_ratio``
    (r = κ·B) fixes κ for both noise kinds; otherwise a preset with a sweep runs :func:`select_kappa`, and
    one without uses its ``kappa_ratio``. ``max_steps`` caps every run's length (the schedule is compressed
    to it; for smoke tests). With ``out``, runs go to ``OUT/<method>-seed<seed>/`` (checkpoint, config,
    metrics), the sweep to ``OUT/select/``, and the tables, JSON, CSV and figures to ``OUT``
    (:func:`write_table1`); a run whose checkpoint is there continues from it (a finished one is reused).
    ``threads`` overrides the preset's pinned CPU thread count (0: torch's default; see :class:`Table1Preset`).
    ``measure_samples`` (curvature columns; 0: the whole split), ``eigen_samples`` (λ_max; 0: not measured) and
    ``hessian_probes`` (0: no Hessian trace) override the preset's end-of-run measurement, and ``trace_points``
    (0: none) its along-training records, so that a smoke run of the paper preset (``max_steps=2``) measures in
    seconds. ``trust`` reads checkpoints that need full unpickling.
    The result holds the paired comparisons by seed and the verdicts on the paper's claims
    (:mod:`gmix_curvature.table1.summary`, :mod:`gmix_curvature.table1.verdict`).

    >>> quick = dataclasses.replace(table1_preset("micro"), methods=("baseline", "gaussian"), trace_points=0, seeds=1)
    >>> res = run_table1(quick, kappa_ratio=1.0)
    >>> [r.method for r in res.rows], res.row("gaussian").kappa_ratio, res.runs[1].kappa  # κ = r / B, B = 64
    (['baseline', 'gaussian'], 1.0, 0.015625)
    """
    p = table1_preset(preset)
    if threads is not None:
        p = dataclasses.replace(p, threads=threads)
    for name, value in (("measure_samples", measure_samples), ("eigen_samples", eigen_samples),
                        ("hessian_probes", hessian_probes), ("trace_points", trace_points)):
        if value is None:
            continue
        if not isinstance(value, int) or value < 0:
            raise GmixError(f"{name} must be an integer >= 0, got {value!r}")
        p = dataclasses.replace(p, **{name: (value or None) if name == "measure_samples" else value})
    with cpu_threads(p.threads):
        return _run_table1(p, seeds, kappa, kappa_ratio, out, data_dir, max_steps, device, progress, plot, log, trust)


def _run_table1(p, seeds, kappa, kappa_ratio, out, data_dir, max_steps, device, progress, plot, log,
                trust=False) -> Table1Result:
    start = time.perf_counter()
    n_seeds = p.seeds if seeds is None else seeds
    if not isinstance(n_seeds, int) or n_seeds < 1:
        raise GmixError(f"seeds must be an integer >= 1, got {n_seeds!r}")
    if kappa is not None and kappa_ratio is not None:
        raise GmixError("give kappa or kappa_ratio, not both")
    if kappa is not None:
        if not kappa > 0:
            raise GmixError(f"kappa must be > 0, got {kappa}")
        kappa_ratio = kappa * p.batch_size
    if kappa_ratio is not None and not kappa_ratio > 0:
        raise GmixError(f"kappa_ratio must be > 0, got {kappa_ratio}")
    if p.needs_data_dir and data_dir is None:
        raise GmixError(f"preset {p.name!r} needs --data-dir, the directory holding the CIFAR python files")
    data = p.train.get("data", "digits")
    train_ds = load_dataset(data, p.train.get("train_split", "train"), data_dir)
    test_ds = load_dataset(data, p.train.get("eval_split", "test"), data_dir)
    measure_ds = test_ds if p.measure_split == p.train.get("eval_split", "test") else load_dataset(
        data, p.measure_split, data_dir)
    samples = {  # seeds 0 and 1: the draws the tables of earlier versions measured on
        "measure": Table1Samples.draw(data, p.measure_split, len(measure_ds), p.measure_samples, 0),
        "eigen": Table1Samples.draw(data, p.train.get("train_split", "train"), len(train_ds), p.eigen_samples or None,
                                    1),
    }
    measure_ds = samples["measure"].select(measure_ds)
    eigen_ds = samples["eigen"].select(train_ds)
    ctx = init_distributed(device)
    root = Path(out) if out is not None else None
    if root is not None and ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)

    selection = None
    if kappa_ratio is not None:
        ratios = {"gaussian": float(kappa_ratio), "rademacher": float(kappa_ratio)}
    elif p.kappa_sweep:
        selection = select_kappa(
            p, noises=[METHOD[k].noise for k in p.methods if METHOD[k].noise != "none"],
            out=root / "select" if root is not None else None, data_dir=data_dir, max_steps=max_steps,
            device=device, progress=progress, log=log, trust=trust,
        )
        ratios = dict(selection.chosen)
    else:
        ratios = {"gaussian": p.kappa_ratio, "rademacher": p.kappa_ratio}
    _log(log, "r = κ·B: " + ", ".join(f"{k} {v:g}" for k, v in ratios.items()))

    runs: list[RunRecord] = []
    for method in TABLE1_METHODS:
        if method.key not in p.methods or (method.small_batch and p.small_batch_size is None):
            continue
        for seed in range(n_seeds):
            runs.append(_train_and_measure(
                p, method.key, seed, ratios, root=root, datasets=(train_ds, test_ds), measure_ds=measure_ds,
                eigen_ds=eigen_ds, samples=samples, max_steps=max_steps, device=device, progress=progress, log=log,
                trust=trust, is_main=ctx.is_main,
            ))
    level, at = matched_loss_trace({i: r.trace for i, r in enumerate(runs)})
    for i, r in enumerate(runs):
        r.metrics["ggn_trace_matched"] = at.get(i, math.nan)
    rows = summarise(runs, ratios)
    comparisons = paired_comparisons(runs)
    first = run_config(
        p, noise="none", batch_size=p.batch_size, kappa_ratio=0.0, seed=0, out=None, num_train=len(train_ds),
        max_steps=max_steps, device=device, progress=False, trace=False,
    )
    result = Table1Result(
        preset=p, kappa_ratios=ratios, selection=selection, runs=runs, rows=rows, matched_loss=level,
        momentum=float(first.momentum), optimizer=first.optimizer, out=root, samples=samples,
        data_dir=None if data_dir is None else str(data_dir), comparisons=comparisons,
        verdicts=judge_claims(comparisons),
    )
    result.seconds = time.perf_counter() - start
    if root is not None and ctx.is_main:
        from gmix_curvature.table1.report import write_table1

        write_table1(result, root, plot=plot)
    return result

