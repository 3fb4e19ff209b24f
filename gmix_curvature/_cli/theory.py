"""``gmix theory``: the theory-verification suite, or the gradient noise scale of a checkpoint.

A thin layer over :func:`gmix_curvature.theory_checks.run_theory_checks` and
:func:`gmix_curvature.theory.gradient_noise_scale`. Exit code 0 when every verdict is the expected one,
1 when some check came out otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "check γ̄, the mixed gradient's second moment, Theorem 1's bound and the critical batch size by simulation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="fast", help="micro (seconds), fast (default, < 2 min) or full")
    p.add_argument("--seed", type=int, default=0, help="seed of every generator of the suite")
    p.add_argument("--json", metavar="OUT", help="write the report (checks and tables) as JSON to OUT")
    p.add_argument("--out", metavar="DIR", help="write report.json, config.json and seaborn plots under DIR")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g = p.add_argument_group("gradient noise scale of a checkpoint (instead of the suite)")
    g.add_argument("--checkpoint", metavar="PATH", help="a gmix checkpoint (or run directory) or a state_dict")
    g.add_argument("--model", help="architecture of a plain state_dict (see gmix train --model)")
    g.add_argument("--trust-checkpoint", dest="trust", action="store_true",
                   help="unpickle a checkpoint that needs it in full (a pickled module), which runs code it names: "
                   "only for files from a source you trust")
    g.add_argument("--data", default="digits", help="data set the noise scale is taken over (default: digits)")
    g.add_argument("--split", default="train", help="split of --data (default: train)")
    g.add_argument("--data-dir", help="directory of the CIFAR files")
    g.add_argument("--num-samples", type=int, help="use only this many samples (the first ones)")
    g.add_argument("--kind", default="gaussian", help="mixing weights for the mixed noise scale (default: gaussian)")
    g.add_argument("--ratio", type=float, default=2.0, help="r = κB of the mixing weights (γ̄ = 1 + r²; default 2)")


def _noise_scale(args: argparse.Namespace) -> int:
    from gmix_curvature.checkpoint import load_checkpoint
    from gmix_curvature.data import load_dataset
    from gmix_curvature.theory import gradient_noise_scale

    ds = load_dataset(args.data, args.split, args.data_dir, num_samples=args.num_samples)
    model, _ = load_checkpoint(args.checkpoint, model=args.model, num_classes=ds.num_classes,
                               input_shape=ds.input_shape, trust=args.trust)
    res = gradient_noise_scale(model.double(), (ds.tensors()[0].double(), ds.tensors()[1]), kind=args.kind,
                               ratio=args.ratio)
    print(f"gradient noise scale of {args.checkpoint} over {args.data}/{args.split} ({res.num_samples} samples, "
          f"{res.num_params} parameters)")
    for name, value in (("tr Σ (σ² per sample)", res.trace_sigma), ("‖∇f‖²", res.grad_norm_sq),
                        ("B_simple = tr Σ/‖∇f‖²", res.b_simple),
                        (f"B_simple with {res.kind} mixing, r={res.ratio:g} (γ̄={res.gamma_bar:g})", res.b_simple_mixed),
                        ("Tr(AᵀA)/n (empirical Fisher)", res.fisher_trace)):
        print(f"  {name:<48} {value:.6g}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res.to_dict(), indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        return _noise_scale(args)
    from gmix_curvature.theory_checks import PRESETS, plot_report, run_theory_checks

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    say = None if args.quiet else (lambda msg: print(f"gmix theory: {msg}", file=sys.stderr, flush=True))
    report = run_theory_checks(args.preset, seed=args.seed, progress=say)
    print(report.table())
    if args.json:
        report.to_json(args.json)
    if args.out:
        out = Path(args.out)
        report.to_json(out / "report.json")
        (out / "config.json").write_text(json.dumps({"preset": report.preset, "seed": report.seed}, indent=1))
        for f in plot_report(report, out):
            print(f"wrote {f}")
    return 0 if report.ok else 1
