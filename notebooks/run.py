"""Execute the notebooks top to bottom, each in a fresh kernel, and write them as HTML for reading.

``make notebooks`` runs ``python notebooks/run.py --out build/notebooks``: every notebook at full size (no
``GMIX_FAST``), its training runs under ``--runs`` (default ``runs/notebooks``; finished runs are reused,
``make clean`` removes them), and ``OUT/<name>.html`` plus the executed ``OUT/<name>.ipynb``. Kernels run on one
thread unless ``--threads`` says otherwise. A notebook that fails is still written (with the error in place) and
the script exits 1 after running the others.

    python notebooks/run.py --out build/notebooks                 # all four, full size
    python notebooks/run.py --out /tmp/nb --fast trace_estimators  # one, as the tests run it
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebook_paths(names: list[str], folder: Path = HERE) -> list[Path]:
    """The notebooks to run: all of ``folder/*.ipynb``, or those named (with or without ``.ipynb``)."""
    available = {p.stem: p for p in sorted(folder.glob("*.ipynb"))}
    if not names:
        return list(available.values())
    unknown = [n for n in names if n.removesuffix(".ipynb") not in available]
    if unknown:
        raise SystemExit(f"run.py: unknown notebook {', '.join(unknown)}; available: {', '.join(available)}")
    return [available[n.removesuffix(".ipynb")] for n in names]


def execute(path: Path, *, env: dict[str, str], timeout: int, cwd: Path):
    """Run one notebook in a fresh ``python3`` kernel (this interpreter's ipykernel); returns
    (executed notebook, error or None)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=env)
    except CellExecutionError as exc:
        return nb, exc
    return nb, None


def to_html(nb, dest: Path) -> None:
    """Write an executed notebook as a self-contained HTML page (figures embedded)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    dest.write_text(body, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the HTML and executed notebooks")
    parser.add_argument("--runs", type=Path, default=Path("runs/notebooks"), help="folder for the training runs")
    parser.add_argument("--fast", action="store_true", help="set GMIX_FAST=1 (the small version the tests run)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    parser.add_argument("--notebooks", type=Path, default=HERE, help="folder holding the notebooks (default: this one)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the kernels (default 1: the notebooks' small models run several times faster on one "
        "thread when the cores are shared; 0 leaves torch's default)",
    )
    args = parser.parse_args(argv)

    import nbformat

    paths = notebook_paths(args.names, args.notebooks)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GMIX_RUNS": str(args.runs.resolve())}
    env.pop("GMIX_FAST", None)
    if args.fast:
        env["GMIX_FAST"] = "1"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    failed = []
    for path in paths:
        start = time.perf_counter()
        nb, error = execute(path, env=env, timeout=args.timeout, cwd=path.parent)
        nbformat.write(nb, args.out / path.name)
        to_html(nb, args.out / f"{path.stem}.html")
        status = "ok" if error is None else f"FAILED ({type(error).__name__})"
        print(f"{path.stem}: {status} in {time.perf_counter() - start:.0f} s -> {args.out / (path.stem + '.html')}")
        if error is not None:
            print(f"{path.stem}: {error.ename}: {error.evalue}", file=sys.stderr)
            failed.append(path.stem)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
