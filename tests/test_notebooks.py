"""The notebooks of notebooks/ (issue 7): each runs top to bottom in a fresh kernel of this interpreter (the
venv's ipykernel) with ``GMIX_FAST=1`` and no error — every notebook asserts its own results in a cell —
and each is committed without outputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"noise_vs_sharpness", "theorem1", "table1", "trace_estimators"}
CELL_TIMEOUT = 300  # seconds per cell: a hang fails the test instead of stalling the suite


def test_the_four_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; commit the notebook cleared"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_fast(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    asserts = [c for c in nb.cells if c.cell_type == "code" and "assert " in c.source]
    assert asserts, f"{path.name} asserts none of its results"
    # one extra cell, executed last, says which interpreter ran the kernel
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    # one thread: the notebooks' small models gain nothing from a second one, and on a busy machine (2 cores
    # shared) OpenMP's barriers make every small op wait for a descheduled thread (measured 5-10x slower)
    env = {**os.environ, "GMIX_FAST": "1", "GMIX_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell's traceback, on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert last == sys.executable


def _run_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebooks_run", NOTEBOOK_DIR / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_py_writes_html_and_reports_a_failing_notebook(tmp_path, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    for name, source in [("good", "x = 6 * 7\nassert x == 42\nprint('answer', x)"), ("bad", "assert 1 == 2, 'boom'")]:
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), folder / f"{name}.ipynb")
    out = tmp_path / "html"
    code = _run_py().main(["--out", str(out), "--notebooks", str(folder), "--runs", str(tmp_path / "runs")])
    assert code == 1
    err = capsys.readouterr().err
    assert "bad: AssertionError: boom" in err and "failed: bad" in err
    assert "answer 42" in (out / "good.html").read_text()
    assert "AssertionError" in (out / "bad.html").read_text()  # written, with the error in place
    assert nbformat.read(out / "good.ipynb", as_version=4).cells[0].outputs


def test_run_py_rejects_an_unknown_notebook(tmp_path):
    with pytest.raises(SystemExit, match="unknown notebook nope; available: .*trace_estimators"):
        _run_py().main(["--out", str(tmp_path), "nope"])
