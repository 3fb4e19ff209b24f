"""Shared fixtures: a runner for the ``gmix`` command line."""

from __future__ import annotations

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
