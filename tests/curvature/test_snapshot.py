"""curvature_snapshot, the record the training engine writes every N steps: on classifiers, on padded token
sequences and with the mse/bce losses (means over the counted predictions), options from the data set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FRESH, materialise

from gmix_curvature.curvature import (
    curvature_snapshot,
    empirical_fisher_trace,
    exact_ggn_trace,
    ggn_trace,
    top_eigenvalues,
)
from gmix_curvature.errors import GmixError


def test_snapshot_values_and_modes_untouched():
    model, x, y = materialise(FRESH[2])
    model.train()  # as the training engine hands it over
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        snap = curvature_snapshot(model, (x, y), method="exact", generator=torch.Generator().manual_seed(0))
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics untouched
    json.dumps(snap)
    assert snap["ggn_trace"] == pytest.approx(exact_ggn_trace(model, (x, y)).value, rel=1e-12)
    assert math.isnan(snap["ggn_trace_stderr"]) and snap["ggn_method"] == "exact"
    assert snap["empirical_fisher_trace"] == pytest.approx(empirical_fisher_trace(model, (x, y)).value, rel=1e-12)
    assert snap["top_eigenvalue"] == pytest.approx(top_eigenvalues(model, (x, y), tol=1e-10).value, rel=1e-3)
    assert snap["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(model(x).detach(), y)), rel=1e-12)
    assert snap["n_samples"] == len(y)


def test_auto_picks_exact_for_few_classes_and_fisher_is_for_many():
    model, x, y = materialise(FRESH[0])
    assert ggn_trace(model, (x, y)).method == "exact"
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 100))
    xs = torch.randn(256, 1, 4, 4, generator=g)
    ys = torch.randint(0, 100, (256,), generator=g)
    r = ggn_trace(net, (xs, ys), generator=0, target_rel_stderr=0.02)
    assert r.method == "fisher_is" and r.rel_stderr <= 0.02 and r.n_probes < 100
    assert "auto" in r.extra
    strict = ggn_trace(net, (xs, ys), generator=0, target_rel_stderr=1e-4)
    # 256 samples: the per-sample standard error is trusted after the first round (AUTO_FIRST_ROUND = 4 passes),
    # which already predicts >= P·K passes
    assert strict.method == "exact" and strict.extra["pilot_passes"] == 4


class TinyLM(torch.nn.Module):
    """Token ids (N, T) -> logits (N, T, V): an embedding, tanh, a linear head."""

    def __init__(self, vocab: int = 7, width: int = 4) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def _case(loss: str):
    """(model, x, targets, ignore_index) for a loss: padded token labels, regression, multi-label targets."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    if loss == "cross_entropy":
        x = torch.randint(1, 7, (4, 5), generator=g)
        y = torch.randint(1, 7, (4, 5), generator=g)
        y[1, 3:], y[3, 2:] = 0, 0  # padded, as Multi30k pads with <pad> = 0
        return TinyLM().double(), x, y, 0
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return net, x, (y if loss == "mse" else (y > 0).double()), -100


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_snapshot_of_sequences_and_other_losses_is_the_mean_over_counted_predictions(loss):
    model, x, y, ignore = _case(loss)
    snap = curvature_snapshot(model, (x, y), method="exact", loss=loss, ignore_index=ignore, eigenvalue=False)
    out = model(x).detach()
    if loss == "cross_entropy":
        counted = y != ignore
        want_loss = torch.nn.functional.cross_entropy(out.movedim(-1, 1), y, ignore_index=ignore)
        want_acc, n = int(((out.argmax(-1) == y) & counted).sum()) / int(counted.sum()), int(counted.sum())
    elif loss == "mse":
        want_loss, want_acc, n = torch.nn.functional.mse_loss(out, y), math.nan, 8
    else:
        want_loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y)
        want_acc, n = float(((out > 0) == (y > 0.5)).double().mean()), 32
    assert snap["loss"] == pytest.approx(float(want_loss), rel=1e-12) and snap["n_predictions"] == n
    assert snap["accuracy"] == pytest.approx(want_acc, rel=1e-12, nan_ok=True)
    exact = exact_ggn_trace(model, (x, y), loss=loss, ignore_index=ignore)
    assert snap["ggn_trace"] == pytest.approx(exact.value, rel=1e-12) and exact.extra["n_predictions"] == n
    ef = empirical_fisher_trace(model, (x, y), loss=loss, ignore_index=ignore)
    assert snap["empirical_fisher_trace"] == pytest.approx(ef.value, rel=1e-12)


def test_snapshot_options_come_from_the_data_set(tmp_path):
    from large_data import write_multi30k

    from gmix_curvature.curvature.snapshot import snapshot_options
    from gmix_curvature.data import load_dataset

    assert snapshot_options(load_dataset("multi30k", "train", write_multi30k(tmp_path))) == {"ignore_index": 0}
    assert snapshot_options(load_dataset("digits", "test")) == {}
    model, x, y, _ = _case("cross_entropy")
    with pytest.raises(GmixError, match="every label is ignore_index"):
        curvature_snapshot(model, (x, torch.zeros_like(y)), method="exact", ignore_index=0, eigenvalue=False)
