"""Sweeps: a preset's grid of training runs, resumable, collected into one CSV and drawn as the paper's figures.

A preset module may define ``GRID``, a dict from axis name to its values. A value is either a plain value
of the TrainConfig field of the same name (``"optimizer": ["sgd", "lars"]``) or a dict of overrides
that go together (``{"batch_size": 512, "warmup_steps": 500}``), labelled by its entry for the axis name.
The cells are the Cartesian product of the axes, in order; each runs in ``OUT/<cell name>/``.

Resuming: a finished cell (``OUT/<cell>/result.json``) is skipped, an interrupted one (a checkpoint but
no result) continues from its checkpoint, bit for bit (:func:`gmix_curvature.train.train` with
``resume=True``). ``OUT/results.csv`` holds one row per finished cell (its axis labels, final metrics
and steps); ``OUT/figure.png`` shows final test accuracy against batch size, one panel per optimizer,
one line per noise kind, error bars over seeds (the layout of Fig. 1–3).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmix_curvature.errors import GmixError

__all__ = ["SweepCell", "SweepResult", "grid_cells", "preset_grid", "run_sweep", "plot_sweep"]


@dataclass(frozen=True)
class SweepCell:
    """One run of a grid: its directory name, its axis labels and its TrainConfig overrides."""

    name: str
    labels: dict[str, Any]
    overrides: dict[str, Any]


@dataclass
class SweepResult:
    """What a sweep produced: the rows of ``results.csv`` and which cells ran, resumed or were skipped."""

    out: Path
    rows: list[dict[str, Any]]
    csv: Path
    figure: Path | None
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.rows)} cells in {self.csv} (ran {len(self.ran)}, resumed {len(self.resumed)}, "
            f"skipped {len(self.skipped)} finished)" + (f"; figure {self.figure}" if self.figure else "")
        )


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def grid_cells(grid: Mapping[str, Sequence[Any]]) -> list[SweepCell]:
    """The cells of a grid, in order (the last axis varies fastest).

    >>> [c.name for c in grid_cells({"batch_size": [200, 500], "noise": ["none", "gaussian"]})]
    ['batch_size=200_noise=none', 'batch_size=200_noise=gaussian', 'batch_size=500_noise=none', \
'batch_size=500_noise=gaussian']
    >>> grid_cells({"batch_size": [{"batch_size": 64, "warmup_steps": 4000}]})[0].overrides
    {'batch_size': 64, 'warmup_steps': 4000}
    """
    axes = []
    for axis, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise GmixError(f"grid axis {axis!r} needs a non-empty list of values")
        entries = []
        for i, v in enumerate(values):
            if isinstance(v, Mapping):
                entries.append((v.get(axis, i), dict(v)))
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
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise GmixError("grid cells are not distinct: two values of an axis have the same label")
    return cells


def preset_grid(name: str) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """A preset's overrides and its ``GRID`` (an empty grid, one cell, when it defines none).

    >>> preset_grid("fig1_sgd_lars")[1]["optimizer"]
    ['sgd', 'lars']
    """
    import importlib

    from gmix_curvature.presets import get_preset

    preset = get_preset(name)  # raises ValueError listing the presets for an unknown name
    module = importlib.import_module(f"gmix_curvature.presets.{name}")
    return preset, {k: list(v) for k, v in dict(getattr(module, "GRID", {})).items()}


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def run_sweep(
    preset: str | Mapping[str, Any],
    *,
    out: str | Path,
    grid: Mapping[str, Sequence[Any]] | None = None,
    overrides: Mapping[str, Any] | None = None,
    train_fn: Callable[..., Any] | None = None,
    datasets: tuple[Any, Any] | None = None,
    plot: bool = True,
    dry_run: bool = False,
) -> SweepResult:
    """Run every cell of a grid that has not finished, then write ``results.csv`` (and ``figure.png``).

    Args:
        preset: a preset name (its ``PRESET`` and ``GRID``) or a dict of TrainConfig overrides.
        out: the sweep's directory; each cell runs in ``out/<cell name>``.
        grid: replaces the preset's ``GRID``.
        overrides: TrainConfig fields set for every cell (before the cell's own values).
        train_fn: the training function (default :func:`gmix_curvature.train.train`), called as
            ``train_fn(config, resume=bool, datasets=datasets)``; it must return an object with
            ``final`` (dict of metrics) and ``steps``.
        datasets: (train, eval) passed to every run instead of loading the data by name.
        plot: draw ``figure.png`` with seaborn.
        dry_run: only list the cells (as rows with ``status``), run nothing.
    """
    from gmix_curvature.train import TrainConfig

    if isinstance(preset, str):
        base, preset_cells = preset_grid(preset)
    else:
        base, preset_cells = dict(preset), {}
    cells = grid_cells(grid if grid is not None else preset_cells)
    out = Path(out)
    if train_fn is None:
        from gmix_curvature.train import train as train_fn
    result = SweepResult(out=out, rows=[], csv=out / "results.csv", figure=None)
    configs = []
    for cell in cells:  # validate every cell before running any
        values = {**base, **dict(overrides or {}), **cell.overrides, "out": str(out / cell.name)}
        configs.append(TrainConfig.from_dict(values))
    for cell, config in zip(cells, configs):
        cell_dir = out / cell.name
        done_file = cell_dir / "result.json"
        status = "finished" if done_file.exists() else "interrupted" if (cell_dir / "checkpoint.pt").exists() else "new"
        if dry_run:
            result.rows.append({"cell": cell.name, **cell.labels, "status": status})
            continue
        if status == "finished":
            row = json.loads(done_file.read_text())
            result.skipped.append(cell.name)
        else:
            config.progress = False
            res = train_fn(config, resume=status == "interrupted", datasets=datasets)
            row = {
                "cell": cell.name,
                **cell.labels,
                "steps": int(res.steps),
                **{k: _finite(v) for k, v in dict(res.final).items()},
            }
            cell_dir.mkdir(parents=True, exist_ok=True)
            done_file.write_text(json.dumps(row, indent=2) + "\n")
            (result.resumed if status == "interrupted" else result.ran).append(cell.name)
        result.rows.append(row)
    if dry_run:
        return result
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.rows).to_csv(result.csv, index=False)
    if plot and result.rows:
        result.figure = plot_sweep(result.csv, out / "figure.png")
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
