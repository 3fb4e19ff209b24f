"""``gmix table1``: a thin layer over :func:`gmix_curvature.table1.run_table1`."""

from __future__ import annotations

import argparse
import sys

HELP = "reproduce Table 1: train SGD with and without GradientMix over seeds, measure Tr(G) and friends, tabulate"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (embedded digits, minutes on a CPU), mnist1d (MNIST-1D, "
                   "about 20 minutes on 2 cores), paper (ResNet-18, CIFAR-10, batch 8192) or micro (seconds); see "
                   "--list-presets")
    p.add_argument("--list-presets", action="store_true", help="list the Table 1 presets and exit")
    p.add_argument("--from-json", default=None, metavar="PATH", help="a finished table's table1.json (or its "
                   "directory): compute the summary, the paired comparisons and the verdict again from the runs it "
                   "recorded and rewrite its tables and figures (no training, no measurement)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per row (default: the preset's)")
    kappa = p.add_mutually_exclusive_group()
    kappa.add_argument("--kappa", type=float, default=None,
                       help="κ of Eq. 12 at the large batch, for both noise kinds (default: the preset's rule)")
    kappa.add_argument("--kappa-ratio", type=float, default=None, help="r = κ·B instead of --kappa (γ̄ = 1 + r²)")
    p.add_argument("--out", default=None, help="output directory: METHOD-seedN/ (one run each), select/, "
                   "table1.{md,json,csv}, runs.csv and the figures (a rerun continues the runs found there)")
    p.add_argument("--data-dir", default=None, help="directory holding the CIFAR python files (paper preset)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every run at N optimizer steps (smoke tests)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the runs (default: the preset's; "
                   "tiny pins 1 so that its table does not depend on the core count; 0: torch's default)")
    p.add_argument("--measure-samples", type=int, default=None, help="measure the curvature columns on N samples "
                   "of the measure split (default: the preset's; 0: all) — with --max-steps, a smoke run in seconds")
    p.add_argument("--eigen-samples", type=int, default=None,
                   help="λ_max of G and of the Hessian on N training samples (default: the preset's; 0: not measured)")
    p.add_argument("--hessian-probes", type=int, default=None,
                   help="Hutchinson probes of the Hessian trace (default: the preset's; 0: not measured)")
    p.add_argument("--trace-points", type=int, default=None,
                   help="records of Tr(G) along each run (default: the preset's; 0: none)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw the figures")
    p.add_argument("--progress", action="store_true", help="progress bars for the training runs")
    p.add_argument("--quiet", action="store_true", help="no per-run log lines on stderr")
    p.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                   help="when continuing runs in --out: unpickle a checkpoint that needs it in full, which runs code "
                   "it names (only for files from a source you trust; gmix's own checkpoints never need it)")


def run(args: argparse.Namespace) -> int:
    from gmix_curvature.table1 import TABLE1_PRESETS, run_table1

    if args.list_presets:
        for name, preset in TABLE1_PRESETS.items():
            print(f"{name:8s} {preset.description}")
        return 0

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.from_json is not None:
        from gmix_curvature.table1 import load_table1

        result = load_table1(args.from_json, write=True, plot=args.plot)
        print(result.format_table())
        print("\nwritten: " + ", ".join(result.files.values()))
        return 0
    result = run_table1(
        args.preset, seeds=args.seeds, kappa=args.kappa, kappa_ratio=args.kappa_ratio, out=args.out,
        data_dir=args.data_dir, max_steps=args.max_steps, device=args.device, progress=args.progress,
        plot=args.plot, log=None if args.quiet else log, threads=args.threads, measure_samples=args.measure_samples,
        eigen_samples=args.eigen_samples, hessian_probes=args.hessian_probes, trace_points=args.trace_points,
        trust=bool(getattr(args, "trust_checkpoint", False)),
    )
    print(result.format_table())
    if result.selection is not None:
        print()
        print(result.selection.format_table())
    if result.files:
        print()
        print("written: " + ", ".join(result.files.values()))
    return 0
