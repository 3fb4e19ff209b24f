"""``gmix sweep PRESET`` and ``gmix sweep --gather DIR``: a thin layer over :func:`gmix_curvature.sweep.run_sweep`
and :func:`gmix_curvature.sweep.gather_sweep`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gmix_curvature.errors import GmixError

HELP = (
    "run a preset's grid of training runs (resuming where it stopped; in parallel with --jobs, one slice per "
    "cluster job with --shard), collect one CSV and draw the figure"
)


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


def _int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text  # run_sweep names the problem in one line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help="a preset name (gmix train --list-presets); its GRID gives the cells")
    p.add_argument("--out", help="the sweep's directory: one folder per cell, results.csv, figure.png (required)")
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
    p.add_argument("--jobs", type=_int, default=1, metavar="N",
                   help="run N cells at a time in worker processes on this machine (default 1)")
    p.add_argument("--shard", metavar="I/N",
                   help="run shard I (0-based) of N: cells I, I+N, ... of the grid; default from a SLURM job array "
                   "(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT); shards may share --out")
    p.add_argument("--threads", type=_int, default=None, metavar="N",
                   help="torch CPU threads per cell (default: the preset's, else the cores // --jobs); recorded per "
                   "row: the same count gives the same results serially, with --jobs or sharded")
    p.add_argument("--gather", metavar="DIR",
                   help="only rebuild DIR/results.csv (and the figure) from the finished cells on disk")
    p.add_argument("--dry-run", action="store_true", help="list the cells (of this shard) and their state; run nothing")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw figure.png")
    p.add_argument("--trust-checkpoint", dest="trust", action="store_true",
                   help="resume interrupted cells from checkpoints that need full unpickling, which runs code they "
                   "name (only for files from a source you trust; gmix's own checkpoints never need it)")


def run(args: argparse.Namespace) -> int:
    from gmix_curvature.sweep import gather_sweep, parse_shard, preset_grid, run_sweep, shard_from_env

    if args.gather is not None:
        if args.preset is not None or args.out is not None:
            raise GmixError("--gather DIR takes no preset and no --out: it rebuilds DIR's results.csv")
        result = gather_sweep(args.gather, plot=args.plot)
        print(result.summary())
        return 0
    if args.preset is None:
        raise GmixError("give a preset (gmix train --list-presets), or --gather DIR")
    if args.out is None:
        raise GmixError("--out DIR is required: the sweep's directory")
    shard = parse_shard(args.shard) if args.shard is not None else shard_from_env()
    _, grid = preset_grid(args.preset)
    for key, values in args.axes:
        parsed = [_parse_value(v) for v in values.split(",") if v != ""]
        if not parsed:
            raise GmixError(f"--axis {key}= needs at least one value")
        for sub in [grid] if isinstance(grid, dict) else grid:
            sub[key] = parsed
    overrides = {k: _parse_value(v) for k, v in args.sets}
    result = run_sweep(
        args.preset, out=args.out, grid=grid, overrides=overrides, plot=args.plot, dry_run=args.dry_run,
        jobs=args.jobs, shard=shard, threads=args.threads, trust=args.trust,
    )
    if args.dry_run:
        for row in result.rows:
            print(f"{row['status']:<12} {row['cell']}")
        print(f"{len(result.rows)} cells")
        return 0
    print(result.summary())
    return 0
