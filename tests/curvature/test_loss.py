"""The loss registry and the predictions of a batch (issue 15 item 1): layouts, the label draws, bad input as one
GmixError from the API, and non-finite outputs stopping with the number of samples affected (issue 14 item 5)."""

from __future__ import annotations

import math

import pytest
import torch
from cases_seq import SEQ_CASES, materialise_seq
from torch import nn

from gmix_curvature.curvature import (
    empirical_fisher_trace,
    exact_ggn_trace,
    ggn_trace,
    hessian_trace,
    hutchinson_ggn_trace,
    top_eigenvalues,
)
from gmix_curvature.curvature._loss import LOSSES, Predictions, get_loss, sample_categorical
from gmix_curvature.curvature._outputs import model_output
from gmix_curvature.errors import GmixError

LM, LM_DICT, TAGGER, MSE, BCE = (SEQ_CASES[i] for i in (0, 1, 3, 4, 6))


def test_registry_names_and_unknown_loss():
    assert list(LOSSES) == ["cross_entropy", "mse", "bce"]
    assert get_loss("bce") is LOSSES["bce"]
    model, x, y = materialise_seq(LM)
    with pytest.raises(GmixError, match="unknown loss 'hinge'; valid: cross_entropy, mse, bce"):
        ggn_trace(model, (x, y), loss="hinge")


@pytest.mark.parametrize(
    ("shape", "labels", "layout", "positions", "width"),
    [
        ((4, 7), (4,), "NC", 1, 7),
        ((4, 5, 7), (4, 5), "NdC", 5, 7),  # a language model: classes last
        ((4, 3, 5, 6), (4, 5, 6), "NCd", 30, 3),  # F.cross_entropy's (N, C, H, W)
        ((4, 3, 3), (4, 3), "NCd", 3, 3),  # both read: F.cross_entropy's layout wins
        ((4, 2, 3, 7), (4, 2, 3), "NdC", 6, 7),
    ],
    ids=["classifier", "sequence", "segmentation", "square-ambiguous", "grid-classes-last"],
)
def test_cross_entropy_layouts(shape, labels, layout, positions, width):
    out = torch.randn(shape)
    y = torch.zeros(labels, dtype=torch.int64)
    pb = Predictions("cross_entropy", out, y)
    assert (pb.layout, pb.positions, pb.width, pb.count) == (layout, positions, width, math.prod(labels))
    torch.testing.assert_close(pb.to_output(pb.rows(out)), out)  # rows and back: a bijection


@pytest.mark.parametrize(
    ("loss", "shape", "positions", "width"),
    [("mse", (4,), 1, 1), ("mse", (4, 3), 1, 3), ("mse", (4, 5, 3), 5, 3), ("bce", (4,), 1, 1), ("bce", (4, 5), 5, 1),
     ("bce", (4, 2, 5), 10, 1)],
)  # fmt: skip
def test_float_target_layouts(loss, shape, positions, width):
    out = torch.randn(shape)
    pb = Predictions(loss, out, torch.rand(shape))
    assert (pb.positions, pb.width, pb.count) == (positions, width, shape[0] * positions)
    torch.testing.assert_close(pb.to_output(pb.rows(out)), out)


def test_sample_categorical_draws_the_proposal():
    """Frequencies of 40,000 draws within 4 binomial standard errors of q; a zero-probability class never drawn."""
    logw = torch.tensor([[0.0, math.log(3.0), -torch.inf, math.log(0.5), -30.0]]).repeat(40_000, 1)
    c = sample_categorical(logw, torch.Generator().manual_seed(0))
    q = torch.softmax(logw[0].double(), 0)
    freq = torch.bincount(c, minlength=5).double() / c.shape[0]
    sd = (q * (1 - q) / c.shape[0]).sqrt()
    assert bool(((freq - q).abs() <= 4 * sd + 1e-12).all()), (freq, q)
    assert int((c == 2).sum()) == 0


def test_mapping_inputs_are_split_into_batches():
    model, x, y = materialise_seq(LM_DICT)
    whole = exact_ggn_trace(model, (x, y), backend="func").value
    assert exact_ggn_trace(model, (x, y), backend="func", batch_size=3).value == pytest.approx(whole, rel=1e-12)
    assert model_output(model(**x)) is not None


def _bad(case, make):
    model, x, y = materialise_seq(case)
    return (model, *make(x, y))


BAD = [
    ("label-shape", LM, lambda x, y: (x, y[:, :4]), {}, "labels of shape \\(4, 4\\) do not match logits \\(4, 5, 7\\)"),
    ("all-ignored", LM, lambda x, y: (x, torch.full_like(y, -100)), {}, "every label is ignore_index \\(-100\\)"),
    ("vocab-index", LM, lambda x, y: (x, y.masked_fill(y == 3, 7)), {}, "labels out of range: found .*7 for a model "
     "with 7 outputs"),
    ("negative-label", LM, lambda x, y: (x, y.masked_fill(y == -100, -1)), {}, "labels out of range: found -1"),
    ("float-labels", LM, lambda x, y: (x, y.double()), {}, "integer class indices"),
    ("other-ignore-index", LM, lambda x, y: (x, y), {"ignore_index": 0}, "labels out of range: found -100"),
    ("mse-int-targets", MSE, lambda x, y: (x, y.long()), {"loss": "mse"}, "needs float targets"),
    ("mse-shape", MSE, lambda x, y: (x, y[:, :2]), {"loss": "mse"}, "targets of shape \\(6, 2\\) do not match"),
    ("bce-range", BCE, lambda x, y: (x, y * 2), {"loss": "bce"}, "targets in \\[0, 1\\]"),
    ("mse-partly-nan", MSE, lambda x, y: (x, torch.where(torch.arange(3) == 0, float("nan"), y)), {"loss": "mse"},
     "6 predictions have targets that are partly NaN"),
    ("bce-all-nan", BCE, lambda x, y: (x, torch.full_like(y, float("nan"))), {"loss": "bce"},
     "every target is NaN \\(loss bce\\)"),
    ("batch-length", LM, lambda x, y: (x, y[:3]), {}, "as long as the batch"),
    ("mapping-batch", LM_DICT, lambda x, y: ({**x, "attention_mask": x["attention_mask"][:3]}, y), {},
     "share their first"),
    ("no-logits", LM_DICT, lambda x, y: (x, y), {"output_fn": lambda o: {"hidden": o["logits"]}},
     "must return a tensor"),
]


@pytest.mark.parametrize("fn", [exact_ggn_trace, hutchinson_ggn_trace, hessian_trace, top_eigenvalues,
                                empirical_fisher_trace], ids=lambda f: f.__name__)
@pytest.mark.parametrize(("name", "case", "make", "kwargs", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_gmix_error(name, case, make, kwargs, match, fn):
    model, x, y = _bad(case, make)
    extra = {"num_probes": 2, "generator": 0} if fn in (hutchinson_ggn_trace, hessian_trace) else {}
    with pytest.raises(GmixError, match=match) as info:
        fn(model, (x, y), **kwargs, **extra)
    assert "\n" not in str(info.value)


def test_model_output_adapter_errors():
    with pytest.raises(GmixError, match="without a 'logits' tensor \\(keys 'hidden'\\)"):
        model_output({"hidden": torch.zeros(2)})
    with pytest.raises(GmixError, match="cannot find the logits in a model output of type str"):
        model_output("logits")
    with pytest.raises(GmixError, match="first element is not a tensor"):
        model_output((None, torch.zeros(2)))


def test_cross_entropy_needs_a_class_dimension():
    net = nn.Linear(3, 1).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(GmixError, match="at least 2 classes"):
        exact_ggn_trace(net, (x, torch.zeros(4, dtype=torch.int64)))
    flat = nn.Sequential(net, nn.Flatten(0))
    with pytest.raises(GmixError, match="needs logits with a class dimension, got shape \\(4,\\)"):
        exact_ggn_trace(flat, (x, torch.zeros(4, dtype=torch.int64)))
    assert exact_ggn_trace(flat, (x, torch.ones(4, dtype=torch.float64)), loss="bce").value > 0


class _PoisonRows(nn.Module):
    """A classifier whose output is NaN (or inf) for the samples whose first input is above 1.5."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        bad = (x[:, 0] > 1.5).unsqueeze(1)
        return torch.where(bad, out * torch.tensor(float("nan")), out)


@pytest.mark.parametrize("fn", [exact_ggn_trace, hutchinson_ggn_trace, hessian_trace, top_eigenvalues,
                                empirical_fisher_trace, ggn_trace], ids=lambda f: f.__name__)
def test_non_finite_outputs_stop_with_the_number_of_samples(fn):
    """Issue 14 item 5: never a silent NaN; the count covers all batches, not just the first bad one."""
    model = _PoisonRows().double()
    x = torch.zeros(10, 3, dtype=torch.float64)
    x[[2, 8], 0] = 2.0  # two bad samples, in different batches of 4
    y = torch.zeros(10, dtype=torch.int64)
    extra = {"num_probes": 2, "generator": 0} if fn in (hutchinson_ggn_trace, hessian_trace) else {}
    with pytest.raises(GmixError, match="not finite \\(NaN or inf\\) for 2 of 10 samples"):
        fn(model, (x, y), batch_size=4, **extra)


def test_segmentation_masks_as_uint8_with_ignore_255():
    """torchvision's segmentation targets: uint8 masks whose 255 marks the pixels to ignore."""
    case = SEQ_CASES[7]
    model, x, y = materialise_seq(case)
    want = exact_ggn_trace(model, (x, y)).value
    mask = y.masked_fill(y == -100, 255).to(torch.uint8)
    assert exact_ggn_trace(model, (x, mask), ignore_index=255).value == pytest.approx(want, rel=1e-12)
    assert hessian_trace(model, (x, mask), ignore_index=255, num_probes=2, generator=0).n_samples == 3


def test_a_batch_dict_is_refused_with_the_alignment_hint():
    model, x, y = materialise_seq(LM_DICT)
    with pytest.raises(GmixError, match="got a mapping: pass \\(inputs, labels\\) with the labels aligned"):
        exact_ggn_trace(model, [{**x, "labels": y}])
