"""``gmix sweep PRESET``: a thin layer over :func:`gmix_curvature.sweep.run_sweep`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gmix_curvature.errors import GmixError

HELP = "run a preset's grid of training runs (resuming where it stopped), collect one CSV and draw the figure"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="a preset name (gmix train --list-presets); its GRID gives the cells")
    p.add_argument("--out", required=True, help="the sweep's directory: one folder per cell, results.csv, figure.png")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        type=_key_value,
        default=[],
        metavar="FIELD=VALUE",
        help="set a training field for every cell (JSON value), e.g. --set data_dir=/data --set epochs=1",
    )
    p.add_argument(
        "--axis",
        dest="axes",
        action="append",
        type=_key_value,
        default=[],
        metavar="FIELD=V1,V2",
        help="replace (or add) a grid axis, e.g. --axis batch_size=200,5000 --axis seed=0",
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw figure.png")


def run(args: argparse.Namespace) -> int:
    from gmix_curvature.sweep import preset_grid, run_sweep

    _, grid = preset_grid(args.preset)
    for key, values in args.axes:
        parsed = [_parse_value(v) for v in values.split(",") if v != ""]
        if not parsed:
            raise GmixError(f"--axis {key}= needs at least one value")
        grid[key] = parsed
    overrides = {k: _parse_value(v) for k, v in args.sets}
    result = run_sweep(args.preset, out=args.out, grid=grid, overrides=overrides, plot=args.plot, dry_run=args.dry_run)
    if args.dry_run:
        for row in result.rows:
            print(f"{row['status']:<12} {row['cell']}")
        print(f"{len(result.rows)} cells")
        return 0
    print(result.summary())
    return 0
