"""Shared fixtures: a runner for the ``gmix`` command line."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest


def run_gmix(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m gmix_curvature ARGS`` in a fresh process and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "gmix_curvature", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def gmix():
    return run_gmix


@contextlib.contextmanager
def _matplotlib_state_kept():
    """The caller's matplotlib as a notebook has it — a backend other than Agg (svg here), a figure of its own
    open — must come out of the block unchanged: same backend, same rcParams, same pyplot figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    old = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        mine = plt.figure()
        rc = dict(matplotlib.rcParams)
        yield
        assert matplotlib.get_backend() == "svg"
        assert dict(matplotlib.rcParams) == rc
        assert plt.get_fignums() == [mine.number] and plt.gcf() is mine
    finally:
        plt.close("all")
        plt.switch_backend(old)


@pytest.fixture
def matplotlib_state_kept():
    """A context manager asserting that the plotting inside it leaves matplotlib's global state alone."""
    return _matplotlib_state_kept
