"""The ``gmix`` command line: a thin layer over functions that return result objects.

Each subcommand lives in ``gmix_curvature/_cli/<name>.py`` with ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; they are found there, not listed here.
Bad input is reported as one line on stderr with exit code 2 (set ``GMIX_DEBUG=1`` for the traceback);
a diverged run exits with 3, a failed checkpoint or metrics write with 74, a run stopped by SIGTERM, SIGINT or
SIGUSR1 (checkpoint written, resumable) with 75, a second Ctrl-C with 130: see :mod:`gmix_curvature.errors`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Sequence

from gmix_curvature import __version__
from gmix_curvature.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_KILLED,
    EXIT_WRITE_FAILED,
    USER_ERRORS,
    RunWriteError,
    TrainingDiverged,
    TrainingInterrupted,
)

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _commands() -> dict[str, object]:
    import gmix_curvature._cli as pkg

    return {
        m.name: importlib.import_module(f"gmix_curvature._cli.{m.name}")
        for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)
        if not m.name.startswith("_")
    }


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser of ``gmix``."""
    parser = _Parser(prog="gmix", description="GradientMix training and curvature toolkit.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gmix-curvature {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in _commands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _prog=p.prog)
    return parser


EPILOG = f"""exit codes:
  0    success
  {EXIT_BAD_INPUT}    bad input; a checkpoint refused (it would run code: see --trust-checkpoint); a locked run
       directory (another process writes it)
  {EXIT_DIVERGED}    a non-finite loss stopped training (the last good checkpoint is kept)
  {EXIT_WRITE_FAILED}   a checkpoint or the metrics could not be written (the previous checkpoint is intact)
  {EXIT_INTERRUPTED}   SIGTERM, SIGINT or SIGUSR1 stopped training after a whole step, checkpoint written: resume it
  {EXIT_KILLED}  a second Ctrl-C stopped at once (the last checkpoint written is intact)"""


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resume_hint(args: argparse.Namespace, exc: TrainingInterrupted) -> str:
    if exc.checkpoint is None:
        return "nothing to resume"
    if args.command == "train":
        return f"resume with: gmix train --resume --out {exc.out}"
    return "run the same command again to continue where it stopped"


def _close_process_group() -> None:
    """Under torchrun: wait for every rank, then tear the process group down before the interpreter exits
    (a gloo group left to the interpreter's shutdown can abort a rank whose peers have already gone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gmix``; returns the exit code (0 success, 2 bad input, 3 a diverged run, 74 a failed write, 75 a run
    stopped by a signal with its checkpoint written, 130 a second Ctrl-C; see :mod:`gmix_curvature.errors`)."""
    # torch's forward-mode AD and linear_operator still use torch.jit.script; the deprecation is theirs
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        code = int(args._run(args) or 0)
        _close_process_group()
        return code
    except TrainingDiverged as exc:
        print(f"{args._prog}: stopped: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as exc:
        _close_process_group()  # every rank stopped at the same step: leave together
        if _is_rank0():
            print(f"{args._prog}: {exc}; {_resume_hint(args, exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunWriteError as exc:
        if os.environ.get("GMIX_DEBUG"):
            raise
        print(f"{args._prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except USER_ERRORS as exc:
        if os.environ.get("GMIX_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or exc.__class__.__name__
        print(f"{args._prog}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{args._prog}: interrupted", file=sys.stderr)
        return EXIT_KILLED


if __name__ == "__main__":
    sys.exit(main())
