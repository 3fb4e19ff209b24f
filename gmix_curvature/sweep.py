"""Sweeps: a preset's grid of training runs, resumable, run in parallel or sharded over a cluster job array,
collected into one CSV and drawn as the paper's figures.

A preset module may define ``GRID``, a dict from axis name to its values. A value is either a plain value
of the TrainConfig field of the same name (``"optimizer": ["sgd", "lars"]``) or a dict of overrides
that go together (``{"batch_size": 512, "warmup_steps": 500}``), labelled by its ``"label"`` entry (not an
override), else its entry for the axis name, else its position.
The cells are the Cartesian product of the axes, in order; each runs in ``OUT/<cell name>/``. ``GRID`` may
also be a list of such dicts: the union of their products (a cell in two of them runs once), for grids that
are not rectangular. Optional, in the preset module: ``CELL`` (``"module:function"``, what runs one cell
instead of :func:`gmix_curvature.train.train`, e.g. train and then measure), ``REPORT`` (``"module:function"``
drawing the results instead of :func:`plot_sweep`, called as ``report(csv, out)``) and ``THREADS`` (the
intra-op thread count every cell runs with).

Resuming: a finished cell (``OUT/<cell>/result.json``) is skipped, an interrupted one (a checkpoint but
no result) continues from its checkpoint, bit for bit (:func:`gmix_curvature.train.train` with
``resume=True``); a diverged run (non-finite loss) is a finished cell whose row says so. ``OUT/results.csv``
holds one row per finished cell (its axis labels, final metrics, steps and thread count); ``OUT/figure.png``
shows final test accuracy against batch size, one panel per optimizer, one line per noise kind, error bars
over seeds (the layout of Fig. 1–3).

Scaling out: ``jobs=N`` runs the cells in N worker processes (spawned) on one machine; ``shard=(i, n)`` runs
cells i, i+n, i+2n, … of the grid (0-based; round robin, so that every shard gets a share of each axis),
one shard per task of a cluster job array (:func:`shard_from_env` reads SLURM's). Any number of processes may
share one ``OUT``: each cell runs under an advisory lock (``fcntl.flock`` on ``OUT/<cell>/.lock``), so a cell
locked by another live process is skipped, a finished one too, and a killed process's lock goes with it (the
kernel drops it). ``results.csv`` is rebuilt from the ``result.json`` files on disk (:func:`gather_sweep`)
at the end of every shard, so the last shard to finish writes the whole table.

Reproducibility: every cell's run is a function of its saved configuration and seed — and of torch's
intra-op thread count, since float reductions are summed in an order that depends on it. Every cell runs with
``threads`` threads (default ``max(1, T // jobs)``, T the launching process's ``torch.get_num_threads()``; a
preset's ``THREADS``, or ``threads=``, pins it), recorded in its row: the same count gives bit-identical
metrics serially, with ``jobs`` or over shards.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import math
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmix_curvature.errors import GmixError, TrainingDiverged

__all__ = [
    "SweepCell",
    "SweepResult",
    "grid_cells",
    "preset_grid",
    "run_sweep",
    "gather_sweep",
    "plot_sweep",
    "parse_shard",
    "shard_from_env",
    "shard_cells",
    "default_threads",
    "cell_lock",
]

Grid = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]]
MANIFEST = "sweep.json"
RESULT = "result.json"
LOCK = ".lock"


@dataclass(frozen=True)
class SweepCell:
    """One run of a grid: its directory name, its axis labels and its TrainConfig overrides."""

    name: str
    labels: dict[str, Any]
    overrides: dict[str, Any]


@dataclass
class SweepResult:
    """What a sweep produced: the rows of ``results.csv`` (every finished cell of the grid, this process's or
    not) and which cells this process ran, resumed, skipped as finished, or left to the live process that
    holds their lock (``busy``); ``missing`` lists the grid's cells without a result yet."""

    out: Path
    rows: list[dict[str, Any]]
    csv: Path
    figure: Path | None
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shard: tuple[int, int] | None = None

    def summary(self) -> str:
        head = f"shard {self.shard[0]}/{self.shard[1]}: " if self.shard else ""
        busy = f", {len(self.busy)} running elsewhere" if self.busy else ""
        counts = (
            f" (ran {len(self.ran)}, resumed {len(self.resumed)}, skipped {len(self.skipped)} finished{busy})"
            if self.ran or self.resumed or self.skipped or self.busy else ""
        )  # fmt: skip
        missing = f"; {len(self.missing)} cells of the grid not finished yet" if self.missing else ""
        return f"{head}{len(self.rows)} cells in {self.csv}{counts}{missing}" + (
            f"; figure {self.figure}" if self.figure else "")


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _product_cells(grid: Mapping[str, Sequence[Any]]) -> list[SweepCell]:
    axes = []
    for axis, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise GmixError(f"grid axis {axis!r} needs a non-empty list of values")
        entries = []
        for i, v in enumerate(values):
            if isinstance(v, Mapping):
                over = {k: x for k, x in v.items() if k != "label"}
                entries.append((v.get("label", v.get(axis, i)), over))
            else:
                entries.append((v, {axis: v}))
        axes.append((axis, entries))
    cells = []
    for combo in itertools.product(*(entries for _, entries in axes)):
        labels, overrides = {}, {}
        for (axis, _), (label, over) in zip(axes, combo):
            labels[axis] = label
            overrides.update(over)
        name = "_".join(f"{axis}={_slug(label)}" for axis, label in labels.items()) or "run"
        cells.append(SweepCell(name, labels, overrides))
    return cells


def grid_cells(grid: Grid) -> list[SweepCell]:
    """The cells of a grid, in order (the last axis varies fastest); a list of grids gives the union of their
    cells in order, a cell that two of them share once.

    >>> [c.name for c in grid_cells({"batch_size": [200, 500], "noise": ["none", "gaussian"]})]
    ['batch_size=200_noise=none', 'batch_size=200_noise=gaussian', 'batch_size=500_noise=none', \
'batch_size=500_noise=gaussian']
    >>> grid_cells({"batch_size": [{"batch_size": 64, "warmup_steps": 4000}]})[0].overrides
    {'batch_size': 64, 'warmup_steps': 4000}
    >>> grid_cells({"mix": [{"label": "gauss-r2", "noise": "gaussian", "kappa_ratio": 2.0}]})[0]
    SweepCell(name='mix=gauss-r2', labels={'mix': 'gauss-r2'}, overrides={'noise': 'gaussian', 'kappa_ratio': 2.0})
    >>> [c.name for c in grid_cells([{"lr": [0.1], "seed": [0, 1]}, {"lr": [0.1, 0.2], "seed": [0]}])]
    ['lr=0.1_seed=0', 'lr=0.1_seed=1', 'lr=0.2_seed=0']
    """
    if isinstance(grid, Mapping):
        cells = _product_cells(grid)
        names = [c.name for c in cells]
        if len(set(names)) != len(names):
            raise GmixError("grid cells are not distinct: two values of an axis have the same label")
        return cells
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise GmixError("a grid is a dict of axes or a non-empty list of such dicts")
    seen: dict[str, SweepCell] = {}
    for sub in grid:
        if not isinstance(sub, Mapping):
            raise GmixError("a grid is a dict of axes or a non-empty list of such dicts")
        for cell in grid_cells(sub):
            if cell.name in seen and seen[cell.name].overrides != cell.overrides:
                raise GmixError(f"grid cell {cell.name!r} appears twice with different settings")
            seen.setdefault(cell.name, cell)
    return list(seen.values())


def _preset_module(name: str) -> Any:
    from gmix_curvature.presets import get_preset

    get_preset(name)  # raises ValueError listing the presets for an unknown name
    return importlib.import_module(f"gmix_curvature.presets.{name}")


def preset_grid(name: str) -> tuple[dict[str, Any], dict[str, list[Any]] | list[dict[str, list[Any]]]]:
    """A preset's overrides and its ``GRID`` (an empty grid, one cell, when it defines none).

    >>> preset_grid("fig1_sgd_lars")[1]["optimizer"]
    ['sgd', 'lars']
    """
    from gmix_curvature.presets import get_preset

    preset = get_preset(name)
    grid = getattr(_preset_module(name), "GRID", {})
    if isinstance(grid, Mapping):
        return preset, {k: list(v) for k, v in dict(grid).items()}
    return preset, [{k: list(v) for k, v in dict(g).items()} for g in grid]


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


# ------------------------------------------------------------------------------------------- scaling out


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as (i, n): shard i (0-based) of n.

    >>> parse_shard("1/4")
    (1, 4)
    >>> parse_shard("3/2")
    Traceback (most recent call last):
    ...
    gmix_curvature.errors.GmixError: shard 3/2: the index must be 0..1 (0-based, of n = 2)
    """
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(text))
    if m is None:
        raise GmixError(f"shard {text!r}: expected I/N, shard I (0-based) of N, e.g. 0/4")
    return _check_shard((int(m.group(1)), int(m.group(2))))


def _check_shard(shard: Any) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise GmixError(f"shard must be a pair (index, count), got {shard!r}") from None
    if n < 1:
        raise GmixError(f"shard {i}/{n}: the number of shards must be >= 1")
    if not 0 <= i < n:
        raise GmixError(f"shard {i}/{n}: the index must be 0..{n - 1} (0-based, of n = {n})")
    return i, n


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of this task of a SLURM job array, or None outside one.

    SLURM numbers an array's tasks by the ids of ``--array``: ``--array=0-9`` gives ``SLURM_ARRAY_TASK_ID``
    0..9, ``--array=1-10`` gives 1..10, ``--array=0-18:2`` gives 0, 2, …, 18. The shard index is
    (``SLURM_ARRAY_TASK_ID`` − ``SLURM_ARRAY_TASK_MIN``) / ``SLURM_ARRAY_TASK_STEP`` (step 1 when unset) and
    the number of shards ``SLURM_ARRAY_TASK_COUNT``, so any such range maps onto shards 0..n-1. An array of
    listed ids (``--array=1,5,7``) does not map: give ``--shard`` explicitly.

    >>> shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"})
    (2, 4)
    >>> shard_from_env({}) is None
    True
    """
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        low, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except ValueError:
        raise GmixError("the SLURM_ARRAY_TASK_* variables are not integers; give --shard I/N") from None
    if step < 1 or (task - low) % step:
        raise GmixError(f"SLURM array task {task} is not min + k*step (min {low}, step {step}); give --shard I/N")
    index = (task - low) // step
    if not 0 <= index < count:
        raise GmixError(f"SLURM array task {task} (min {low}, step {step}) is not one of {count} evenly spaced "
                        "tasks (an --array of listed ids?); give --shard I/N")
    return index, count


def shard_cells(cells: Sequence[Any], shard: tuple[int, int] | None) -> list[Any]:
    """Shard i of n: the cells i, i+n, i+2n, … (round robin); all of them for None.

    >>> shard_cells(list("abcde"), (1, 2))
    ['b', 'd']
    """
    if shard is None:
        return list(cells)
    i, n = _check_shard(shard)
    return list(cells[i::n])


def default_threads(jobs: int = 1, threads_available: int | None = None) -> int:
    """Intra-op threads per worker: ``max(1, T // jobs)``, T the launching process's torch thread count
    (the cores torch sees, or ``OMP_NUM_THREADS``) unless given.

    >>> default_threads(2, 8), default_threads(4, 2), default_threads(1, 3)
    (4, 1, 3)
    """
    if threads_available is None:
        import torch

        threads_available = torch.get_num_threads()
    return max(1, int(threads_available) // max(1, int(jobs)))


@contextlib.contextmanager
def cell_lock(cell_dir: str | Path) -> Iterator[bool]:
    """Hold the advisory lock of a cell directory for the block: yields True when this process got it and
    False when another live process holds it (never waits). ``fcntl.flock`` on ``CELL/.lock``: released on
    exit and by the kernel when the holder dies (a killed shard leaves no stale lock). The lock file says who
    holds it (host and pid), for people. Over NFS, Linux implements flock with the server's byte-range locks,
    so the lock holds between nodes; Lustre needs its ``flock`` mount option.
    """
    import fcntl

    path = Path(cell_dir)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another open file description
            yield False
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve(fn: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(fn):
        return fn
    module, _, attr = str(fn).partition(":")
    if not attr:
        raise GmixError(f"a cell function is 'module:function', got {fn!r}")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class _Task:
    """One cell for a worker: everything it needs, picklable (the function by reference or by name)."""

    cell: SweepCell
    config: Any
    train_fn: Callable[..., Any] | str
    datasets: tuple[Any, Any] | None
    threads: int
    trust: bool = False


def _run_cell(task: _Task) -> tuple[str, dict[str, Any] | None]:
    """Run one cell under its lock: ("ran" | "resumed", row), ("skipped", row) when finished, ("busy", None)
    when another live process holds the lock."""
    cell, config = task.cell, task.config
    cell_dir = Path(config.out)
    done_file = cell_dir / RESULT
    if done_file.exists():
        return "skipped", json.loads(done_file.read_text())
    with cell_lock(cell_dir) as mine:
        if not mine:
            return "busy", None
        if done_file.exists():  # finished by another process between the check and the lock
            return "skipped", json.loads(done_file.read_text())
        resume = (cell_dir / "checkpoint.pt").exists()
        config.progress = False
        row: dict[str, Any] = {"cell": cell.name, **cell.labels}
        with _torch_threads(task.threads):
            try:
                trust = {"trust": True} if task.trust else {}  # a cell function need not know the keyword
                res = _resolve(task.train_fn)(config, resume=resume, datasets=task.datasets, **trust)
            except TrainingDiverged as exc:  # a result, not a failure of the sweep: recorded, not rerun
                row.update(steps=None, diverged=" ".join(str(exc).split()))
            else:
                row.update(steps=int(res.steps), **{k: _finite(v) for k, v in dict(res.final).items()})
        row["threads"] = task.threads
        _atomic_write(done_file, json.dumps(row, indent=2) + "\n")
        return ("resumed" if resume else "ran"), row


def _cell_status(cell_dir: Path) -> str:
    if (cell_dir / RESULT).exists():
        return "finished"
    if (cell_dir / LOCK).exists():
        with cell_lock(cell_dir) as mine:
            if not mine:
                return "running"
    return "interrupted" if (cell_dir / "checkpoint.pt").exists() else "new"


def _pool(jobs: int) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def run_sweep(
    preset: str | Mapping[str, Any],
    *,
    out: str | Path,
    grid: Grid | None = None,
    overrides: Mapping[str, Any] | None = None,
    train_fn: Callable[..., Any] | str | None = None,
    datasets: tuple[Any, Any] | None = None,
    plot: bool = True,
    dry_run: bool = False,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
    threads: int | None = None,
    trust: bool = False,
) -> SweepResult:
    """Run every cell of a grid (of this ``shard``) that has not finished, in ``jobs`` processes, then
    gather ``results.csv`` (and ``figure.png``) from every finished cell on disk.

    Args:
        preset: a preset name (its ``PRESET``, ``GRID`` and optional ``CELL``, ``REPORT``, ``THREADS``) or a
            dict of TrainConfig overrides.
        out: the sweep's directory; each cell runs in ``out/<cell name>``.
        grid: replaces the preset's ``GRID``.
        overrides: TrainConfig fields set for every cell (before the cell's own values).
        train_fn: the training function, or its ``"module:function"`` name (default: the preset's ``CELL``,
            else :func:`gmix_curvature.train.train`), called as ``train_fn(config, resume=bool,
            datasets=datasets)``; it must return an object with ``final`` (dict of metrics) and ``steps``.
            With ``jobs > 1`` it is sent to the workers, so it must be picklable (a module-level function).
        datasets: (train, eval) passed to every run instead of loading the data by name.
        plot: draw ``figure.png`` with seaborn (or the preset's ``REPORT``).
        dry_run: only list the cells of this shard (as rows with ``status``: new, interrupted, running (locked
            by a live process), finished), run nothing.
        jobs: worker processes (spawned) on this machine; 1 runs the cells in this process.
        shard: (i, n): run cells i, i+n, … only (:func:`shard_cells`); None: all.
        threads: torch intra-op threads of every cell (default: the preset's ``THREADS``, else
            :func:`default_threads`); recorded in each row.
        trust: resume interrupted cells from checkpoints that need full unpickling (which runs code they name;
            passed to ``train_fn`` as ``trust=True``); see :mod:`gmix_curvature.checkpoint`.
    """
    from gmix_curvature.train import TrainConfig

    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise GmixError(f"jobs must be an integer >= 1, got {jobs!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise GmixError(f"threads must be an integer >= 1, got {threads!r}")
    shard = None if shard is None else _check_shard(shard)
    module = None
    if isinstance(preset, str):
        base, preset_cells = preset_grid(preset)
        module = _preset_module(preset)
    else:
        base, preset_cells = dict(preset), {}
    cells = grid_cells(grid if grid is not None else preset_cells)
    out = Path(out)
    train_fn = train_fn or getattr(module, "CELL", None) or "gmix_curvature.train:train"
    report = getattr(module, "REPORT", None)
    if threads is None:
        threads = getattr(module, "THREADS", None) or default_threads(jobs)
    configs = []
    for cell in cells:  # validate every cell before running any
        values = {**base, **dict(overrides or {}), **cell.overrides, "out": str(out / cell.name)}
        configs.append(TrainConfig.from_dict(values))
    mine = shard_cells(list(zip(cells, configs)), shard)
    if dry_run:
        rows = [{"cell": c.name, **c.labels, "status": _cell_status(out / c.name)} for c, _ in mine]
        return SweepResult(out=out, rows=rows, csv=out / "results.csv", figure=None, shard=shard)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"preset": preset if isinstance(preset, str) else None, "report": report,
                "cells": [c.name for c in cells]}  # fmt: skip
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    tasks = [_Task(c, cfg, train_fn, datasets, threads, trust) for c, cfg in mine]
    todo = [t for t in tasks if not (out / t.cell.name / RESULT).exists()]
    outcomes: dict[str, str] = {t.cell.name: "skipped" for t in tasks}
    if jobs == 1 or len(todo) <= 1:
        for t in todo:
            outcomes[t.cell.name] = _run_cell(t)[0]
    else:
        import pickle

        try:
            pickle.dumps(todo[0])
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise GmixError(f"jobs > 1 sends each cell to a worker process, but it cannot be pickled: {exc}") from None
        with _pool(min(jobs, len(todo))) as pool:
            futures = [(t.cell.name, pool.submit(_run_cell, t)) for t in todo]
            try:
                for name, fut in futures:
                    outcomes[name] = fut.result()[0]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    result = gather_sweep(out, cells=[c.name for c in cells], plot=plot, report=report)
    result.shard = shard
    for name, how in outcomes.items():
        {"ran": result.ran, "resumed": result.resumed, "skipped": result.skipped, "busy": result.busy}[how].append(name)
    return result


def gather_sweep(
    out: str | Path,
    *,
    cells: Sequence[str] | None = None,
    plot: bool = True,
    report: Callable[..., Any] | str | None = None,
) -> SweepResult:
    """Rebuild ``OUT/results.csv`` (and the figure) from the finished cells on disk: one row per cell with a
    ``result.json``, in the grid's order. ``cells`` defaults to the grid recorded in ``OUT/sweep.json`` by
    the last sweep started there (and ``report`` to its preset's ``REPORT``); a directory without one gives
    every cell it holds, by name. Writes are atomic and serialised by a lock on ``OUT/.gather.lock``, so
    concurrent shards leave the table of the last one to gather.
    """
    out = Path(out)
    if not out.is_dir():
        raise GmixError(f"{out} is not a directory (expected a sweep's output directory)")
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else {}
    if cells is None:
        cells = manifest.get("cells")
        if report is None:
            report = manifest.get("report")
    if cells is None:
        cells = sorted(p.parent.name for p in out.glob(f"*/{RESULT}"))
    if not cells:
        raise GmixError(f"{out} holds no sweep: no {MANIFEST} and no cell with a {RESULT}")
    result = SweepResult(out=out, rows=[], csv=out / "results.csv", figure=None)
    for name in cells:
        done = out / name / RESULT
        if done.exists():
            result.rows.append(json.loads(done.read_text()))
        else:
            result.missing.append(name)
    if not result.rows:
        return result
    import fcntl

    import pandas as pd

    with open(out / ".gather.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _atomic_write(result.csv, pd.DataFrame(result.rows).to_csv(index=False))
            if plot:
                if report is not None:
                    result.figure = _resolve(report)(result.csv, out)
                else:
                    result.figure = plot_sweep(result.csv, out / "figure.png")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return result


def plot_sweep(csv: str | Path, path: str | Path, *, metric: str = "test_acc") -> Path:
    """Draw a sweep's CSV as in Fig. 1–3: ``metric`` (in %) against batch size, one panel per optimizer,
    one line per noise kind, error bars (standard error) over the remaining axes such as the seed.

    Drawn on a :class:`matplotlib.figure.Figure` with seaborn's axes-level functions: matplotlib's backend,
    pyplot's figures and the global rcParams are left as they were (a notebook's own plots still show).
    """
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    df = pd.read_csv(csv)
    if metric not in df:
        raise GmixError(f"{csv} has no column {metric!r}; columns: {', '.join(df.columns)}")
    df = df.assign(**{metric: 100 * df[metric]})
    x = "batch_size" if "batch_size" in df and df["batch_size"].nunique() > 1 else "cell"
    kw: dict[str, Any] = {"hue": "noise", "hue_order": list(dict.fromkeys(df["noise"]))} if "noise" in df else {}
    panels = list(dict.fromkeys(df["optimizer"])) if "optimizer" in df else [None]
    with sns.axes_style("darkgrid"):  # seaborn's default style, as a context: rcParams are restored after
        fig = Figure(figsize=(3.5 * len(panels) + 1.0, 3.2), layout="constrained")
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for i, (ax, panel) in enumerate(zip(axes, panels)):
            sub = df if panel is None else df[df["optimizer"] == panel]
            sns.lineplot(data=sub, x=x, y=metric, marker="o", errorbar="se", ax=ax, legend=i == len(panels) - 1,
                         **kw)
            if x == "batch_size":
                ax.set_xscale("log")
            ax.set(xlabel="batch size" if x == "batch_size" else "run", ylabel=f"{metric} (%)",
                   title="" if panel is None else f"optimizer = {panel}")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
