"""Top eigenvalues by Lanczos against a dense eigendecomposition on a tiny model."""

from __future__ import annotations

import pytest
import torch
from cases_kernels import ROUTED, build
from conftest import FRESH, TRAINED, materialise

from gmix_curvature.curvature import dense_ggn, dense_hessian, top_eigenvalues
from gmix_curvature.curvature._model import kernel_context
from gmix_curvature.errors import GmixError


@pytest.mark.parametrize("case", [FRESH[0], FRESH[2], TRAINED[0]], ids=lambda c: c.id)
def test_ggn_top_eigenvalues_match_dense(case):
    model, x, y = materialise(case)
    want = torch.linalg.eigvalsh(dense_ggn(model, x)).flip(0)[:3]
    r = top_eigenvalues(model, (x, y), k=3, tol=1e-10)
    torch.testing.assert_close(torch.tensor(r.extra["eigenvalues"], dtype=torch.float64), want, rtol=1e-7, atol=0)
    assert r.value == r.extra["eigenvalues"][0] and r.quantity == "ggn_top_eigenvalues"


def test_hessian_top_eigenvalue_matches_dense():
    model, x, y = materialise(FRESH[0])
    want = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)[:1]
    r = top_eigenvalues(model, [(x[:10], y[:10]), (x[10:], y[10:])], k=1, matrix="hessian", tol=1e-9)
    assert r.value == pytest.approx(float(want[0]), rel=1e-7)


def test_bad_arguments():
    model, x, y = materialise(FRESH[0])
    with pytest.raises(GmixError, match="unknown matrix 'fisher'"):
        top_eigenvalues(model, (x, y), matrix="fisher")
    with pytest.raises(GmixError, match="k must lie in"):
        top_eigenvalues(model, (x, y), k=0)


@pytest.mark.parametrize("name", ROUTED)
def test_top_eigenvalues_through_fused_kernels(name):
    """Lanczos on GGN-vector products (forward mode) and Hessian-vector products (reverse over reverse) through
    the kernels bn_mode_context routes around, against dense matrices from torch.func (jacrev for G, hessian
    for the Hessian, the latter checked against differences of gradients in test_hessian.py)."""
    model, x, y = build(name)
    want = torch.linalg.eigvalsh(dense_ggn(model, x, y)).flip(0)[:2]
    r = top_eigenvalues(model, (x, y), k=2, tol=1e-10)
    torch.testing.assert_close(torch.tensor(r.extra["eigenvalues"], dtype=torch.float64), want, rtol=1e-7, atol=0)
    with kernel_context():
        top = float(torch.linalg.eigvalsh(dense_hessian(model, x, y))[-1])
    assert top_eigenvalues(model, (x, y), k=1, matrix="hessian", tol=1e-10).value == pytest.approx(top, rel=1e-7)
