"""The ``gmix`` command line: a thin layer over functions that return result objects.

Each subcommand lives in ``gmix_curvature/_cli/<name>.py`` with ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; they are found there, not listed here.
Bad input is reported as one line on stderr with exit code 2 (set ``GMIX_DEBUG=1`` for the traceback);
a diverged run exits with 3.
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
from gmix_curvature.errors import USER_ERRORS, TrainingDiverged

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
    parser = _Parser(prog="gmix", description="GradientMix training and curvature toolkit.")
    parser.add_argument("--version", action="version", version=f"gmix-curvature {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in _commands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _prog=p.prog)
    return parser


def _close_process_group() -> None:
    """Under torchrun: wait for every rank, then tear the process group down before the interpreter exits
    (a gloo group left to the interpreter's shutdown can abort a rank whose peers have already gone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gmix``; returns the exit code (0 success, 2 bad input, 3 a diverged run)."""
    # torch's forward-mode AD and linear_operator still use torch.jit.script; the deprecation is theirs
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        code = int(args._run(args) or 0)
        _close_process_group()
        return code
    except TrainingDiverged as exc:
        print(f"{args._prog}: stopped: {exc}", file=sys.stderr)
        return 3
    except USER_ERRORS as exc:
        if os.environ.get("GMIX_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or exc.__class__.__name__
        print(f"{args._prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args._prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
