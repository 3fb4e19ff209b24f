"""``gmix trace``: a thin layer over :func:`gmix_curvature.curvature.report.trace_checkpoint`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "measure Tr(G) (and related curvature) of a checkpoint: exact, stochastic with error bars, Hessian"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gmix_curvature.curvature.report import TRACE_LOSSES, TRACE_METHODS
    from gmix_curvature.data import DATASETS

    p.add_argument("checkpoint", help="checkpoint.pt of `gmix train` (or its run directory), a state_dict or module")
    p.add_argument("--data", help=f"one of {', '.join(DATASETS)} (default: the checkpoint's own); imagenet and "
                   "imagefolder (any ImageFolder: DIR/train, DIR/val or DIR/<class>) and multi30k read --data-dir")
    p.add_argument("--data-dir", help="directory holding the data set's files")
    p.add_argument("--split", default="train", help="train, test, fit or val (default: train)")
    p.add_argument("--samples", type=int, default=1024, help="number of samples, a random subset (default 1024)")
    p.add_argument("--all-samples", action="store_true", help="use the whole split instead of --samples")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of the passes (default 128)")
    p.add_argument("--method", default="auto", choices=TRACE_METHODS, metavar="METHOD",
                   help=f"one of {', '.join(TRACE_METHODS)} (default auto)")
    p.add_argument("--probes", type=int, help="probes of the stochastic methods (default 16)")
    p.add_argument("--target-rel-stderr", type=float, help="run stochastic methods to this relative stderr")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of the probes (default 0)")
    p.add_argument("--bn-mode", default="eval", choices=("eval", "train"), help="BatchNorm statistics (default eval)")
    p.add_argument("--loss", default="cross_entropy", choices=TRACE_LOSSES, metavar="LOSS",
                   help=f"one of {', '.join(TRACE_LOSSES)} (default cross_entropy; class labels become one-hot "
                   "targets for mse and bce): G is the GGN of this loss")
    p.add_argument("--ignore-index", type=int, help="label that counts in no prediction, e.g. padding (default: the "
                   "data set's padding label, multi30k's <pad> = 0, else -100)")
    p.add_argument("--model", help="architecture of a plain state_dict: a gmix model or torchvision:NAME")
    p.add_argument("--num-classes", type=int, help="classes of a plain state_dict (default: from its last layer)")
    p.add_argument("--input-shape", help="input shape of a plain state_dict, e.g. 3,32,32")
    p.add_argument("--model-kwargs", help="JSON keyword arguments of the architecture, e.g. '{\"width\": 16}'")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--trust-checkpoint", dest="trust", action="store_true",
                   help="unpickle a checkpoint that needs it in full (a pickled module), which runs code it names: "
                   "only for files from a source you trust")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from gmix_curvature.curvature._data import world
    from gmix_curvature.curvature.report import format_table, trace_checkpoint
    from gmix_curvature.distributed import init_distributed
    from gmix_curvature.errors import GmixError

    shape = None
    if args.input_shape:
        try:
            shape = [int(s) for s in args.input_shape.split(",")]
        except ValueError:
            raise GmixError(f"--input-shape must be integers separated by commas, got {args.input_shape!r}") from None
    kwargs = None
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise GmixError(f"--model-kwargs is not JSON: {exc}") from None
    init_distributed(args.device)
    report = trace_checkpoint(
        args.checkpoint, method=args.method, data=args.data, data_dir=args.data_dir, split=args.split,
        samples=None if args.all_samples else args.samples, batch_size=args.batch_size, num_probes=args.probes,
        target_rel_stderr=args.target_rel_stderr, seed=args.seed, bn_mode=args.bn_mode, model=args.model,
        num_classes=args.num_classes, input_shape=shape, model_kwargs=kwargs, device=args.device,
        progress=args.progress and sys.stderr.isatty(), trust=args.trust, loss=args.loss,
        ignore_index=args.ignore_index,
    )  # fmt: skip
    if world()[0] != 0:
        return 0
    print(format_table(report))
    d = report.data
    print(f"# {report.convention}; loss={d['loss']}, ignore_index={d['ignore_index']}: the mean over "
          f"n={d['n_predictions']} counted predictions of {d['samples']} samples of {d['name']} {d['split']}; "
          f"bn_mode={args.bn_mode}")
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0
