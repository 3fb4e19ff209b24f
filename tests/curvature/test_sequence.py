"""Tr(G) of models with several predictions per sample and of other losses (issue 15 items 1-2): exact against
the GGN materialised with torch.func (G = Jᵀ ∇²L J of the torch loss functional), the stochastic estimators
unbiased on a fresh and a trained, confident LM, random signs per position, padding, the empirical Fisher,
eigenvalues and the Hessian, auto on a large vocabulary, float32 on saturated outputs (bad input: test_loss.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from cases_seq import IGNORE, LM_FRESH, LM_TRAINED, SEQ_CASES, TinyLM, materialise_seq
from torch import nn

from gmix_curvature.curvature import (
    EstimatorWarning,
    dense_ggn,
    dense_hessian,
    empirical_fisher_trace,
    exact_ggn_trace,
    ggn_trace,
    hessian_trace,
    top_eigenvalues,
)
from gmix_curvature.curvature._engine import row_terms, run_per_sample
from gmix_curvature.curvature._loss import sample_categorical
from gmix_curvature.curvature.reference import flat_param_names, reference_loss
from gmix_curvature.curvature.sampled import fisher_is_terms
from gmix_curvature.transformer import PAD

REL = 1e-8  # exact == dense in float64 (the tolerance)
Z = 4.0  # standard errors allowed between a stochastic mean and the exact value (false alarm 6e-5 per check)
BACKENDS = ["func", "auto"]  # the whole-model torch.func path, and the per-layer rules where they apply
BACKEND = "auto"


def _blocks(dense: torch.Tensor, model: nn.Module) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, d in zip(flat_param_names(model), torch.diagonal(dense).tolist()):
        out[name] = out.get(name, 0.0) + d
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SEQ_CASES, ids=lambda c: c.id)
def test_exact_matches_dense_ggn(case, backend):
    model, x, y = materialise_seq(case)
    dense = dense_ggn(model, x, y, loss=case.loss)
    r = exact_ggn_trace(model, (x, y), loss=case.loss, backend=backend)
    assert r.value == pytest.approx(float(dense.trace()), rel=REL)
    for name, b in _blocks(dense, model).items():
        assert r.per_param[name] == pytest.approx(b, rel=REL, abs=1e-12 * r.value)
    # counted predictions: labels not ignored; one per D-vector for mse; one per element for bce (NaN: not counted)
    known = int((~torch.isnan(y)).sum()) if y.is_floating_point() else 0
    counted = {"cross_entropy": int((y != IGNORE).sum()), "mse": known // y.shape[-1], "bce": known}
    assert r.extra["n_predictions"] == counted[case.loss]
    assert r.n_samples == y.shape[0] and r.extra["loss"] == case.loss


def test_exact_on_the_trained_lm_and_its_cost():
    model, x, y = materialise_seq(LM_TRAINED)
    r = exact_ggn_trace(model, (x, y), backend=BACKEND)
    assert r.value == pytest.approx(float(dense_ggn(model, x, y).trace()), rel=REL)
    # one backward pass per (position with a counted label, class): positions 0..3 of 5, 7 classes
    assert r.extra["backward_passes"] == 4 * 7


def _prediction_losses(case, out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each counted prediction's own loss, written out per layout."""
    F = nn.functional
    if case.loss == "mse":  # a prediction is the last axis, ℓ = ‖f − y‖²/D
        return [(out[i] - y[i]).square().sum() / y.shape[-1] for i in range(y.shape[0])]
    if case.loss == "bce":
        return [F.binary_cross_entropy_with_logits(out[i, j], y[i, j]) for i, j in torch.ones_like(y).nonzero()]
    losses = []
    for idx in (y != IGNORE).nonzero().tolist():
        if out.ndim == 4:  # (N, C, H, W)
            logits = out[idx[0], :, idx[1], idx[2]]
        else:  # (N, T, C)
            logits = out[idx[0], idx[1]]
        losses.append(F.cross_entropy(logits[None], y[tuple(idx)][None]))
    return losses


@pytest.mark.parametrize("case", [SEQ_CASES[i] for i in (0, 3, 4, 6, 7)], ids=lambda c: c.id)
def test_empirical_fisher_is_the_mean_squared_gradient_of_each_prediction(case):
    """(1/n) Σ_t ‖∇_θ ℓ_t‖², one backward pass per counted prediction (the loop reference)."""
    model, x, y = materialise_seq(case)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    losses = _prediction_losses(case, out, y)
    total = 0.0
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        total += float(sum(g.square().sum() for g in grads))
    r = empirical_fisher_trace(model, (x, y), loss=case.loss, backend=BACKEND)
    assert r.extra["n_predictions"] == len(losses)
    assert r.value == pytest.approx(total / len(losses), rel=REL)


STOCHASTIC = ["fisher_is", "output_hutchinson", "fisher_mc", "hutchinson"]


@pytest.mark.parametrize("method", STOCHASTIC)
@pytest.mark.parametrize("case", [c for c in SEQ_CASES if c.name != "tiny_lm_dict"], ids=lambda c: c.id)
def test_stochastic_unbiased_on_fresh_models(case, method):
    model, x, y = materialise_seq(case)
    exact = exact_ggn_trace(model, (x, y), loss=case.loss, backend=BACKEND).value
    r = ggn_trace(model, (x, y), method, num_probes=24, generator=3, loss=case.loss, backend=BACKEND)
    assert r.n_probes == 24 and r.stderr > 0
    assert abs(r.value - exact) < Z * r.stderr, (r.value, exact, r.stderr)


@pytest.mark.parametrize("method", ["fisher_is", "output_hutchinson", "hutchinson"])
def test_stochastic_unbiased_on_the_trained_confident_lm(method):
    model, x, y = materialise_seq(LM_TRAINED)
    exact = exact_ggn_trace(model, (x, y), backend=BACKEND).value
    r = ggn_trace(model, (x, y), method, num_probes=48, generator=4, backend=BACKEND)
    assert abs(r.value - exact) < Z * r.stderr, (r.value, exact, r.stderr)


def test_fisher_mc_warns_on_the_trained_lm_not_on_the_fresh_one():
    model, x, y = materialise_seq(LM_TRAINED)
    with pytest.warns(EstimatorWarning, match="too confident"):
        r = ggn_trace(model, (x, y), "fisher_mc", num_probes=16, generator=5, backend=BACKEND)
    assert r.extra["effective_sample_size"] < 30
    model, x, y = materialise_seq(LM_FRESH)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorWarning)
        r = ggn_trace(model, (x, y), "fisher_mc", num_probes=16, generator=5, backend=BACKEND)
    assert r.extra["effective_sample_size"] > 30


@pytest.mark.parametrize(("method", "few"), [("fisher_is", 16), ("output_hutchinson", 16), ("hutchinson", 16),
                                             ("fisher_mc", 256)])  # fmt: skip
def test_stderr_shrinks_as_one_over_sqrt_probes_on_the_trained_lm(method, few):
    """Four times the probes halve the standard error; each is estimated from K probe values, the ratio's
    relative spread is about sqrt(1/(2·16) + 1/(2·64)) = 0.2, so 2 ± 3·0.2·2 is allowed. fisher_mc starts from
    256 probes: fewer draw too few labels off the predicted class for its standard error to mean anything."""
    model, x, y = materialise_seq(LM_TRAINED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        a = ggn_trace(model, (x, y), method, num_probes=few, generator=21, backend=BACKEND)
        b = ggn_trace(model, (x, y), method, num_probes=4 * few, generator=22, backend=BACKEND)
    assert 0.8 < a.stderr / b.stderr < 3.2


def _is_terms_without_signs(pb, g, diag):
    loss, s = pb.loss, pb.stats
    c = sample_categorical(loss.log_column_weights(s), g)
    yield row_terms(pb, loss.log_trace_h(s), loss.column_unit(s, c), signs=None)


class _Repeat(nn.Module):
    """(N, C) -> (N, T, C): the same logits at every position, so the per-position gradients coincide."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1).expand(-1, 6, -1)


def test_signs_per_position_remove_the_cross_terms():
    """Importance-sampled directions u_c are not zero-mean: without random signs, the cross terms
    ⟨J_tᵀ v_t, J_t'ᵀ v_t'⟩ between a sample's positions stay in the estimate. On a model whose positions share
    their gradients (and a confident one, where E_q[u_c] is far from 0) that bias is many standard errors;
    with a sign per position the same draws are unbiased."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), _Repeat()).double()
    with torch.no_grad():
        model[0].weight.copy_(0.3 * torch.randn(5, 3, generator=g, dtype=torch.float64))
        model[0].bias.copy_(torch.tensor([4.0, 0, 0, 0, 0]))
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.zeros(8, 6, dtype=torch.int64)
    exact = exact_ggn_trace(model, (x, y), backend=BACKEND).value
    common = {"method": "fisher_is", "num_probes": 32, "generator": 8, "target_rel_stderr": None, "max_probes": None,
              "bn_mode": "eval", "batch_size": None, "backend": BACKEND, "progress": False}
    naive = run_per_sample(model, (x, y), terms=_is_terms_without_signs, **common)
    assert naive.value - exact > 10 * naive.stderr, (naive.value, exact, naive.stderr)
    signed = run_per_sample(model, (x, y), terms=fisher_is_terms, **common)
    assert abs(signed.value - exact) < Z * signed.stderr, (signed.value, exact, signed.stderr)


@pytest.mark.parametrize("method", ["exact", "fisher_is"])
def test_padding_gives_the_trace_of_the_same_tokens_unpadded(method):
    """The padded batch counts the same predictions as the sequences run one by one at their own lengths
    (right padding, causal attention): the same Tr(G), exactly for exact and within errors for fisher_is."""
    model, x, y = materialise_seq(LM_FRESH)
    lengths = [int((row != PAD).sum()) for row in x]
    assert sorted(set(lengths)) == [3, 4, 5]
    unpadded = [(x[i : i + 1, :length], y[i : i + 1, :length]) for i, length in enumerate(lengths)]
    padded = ggn_trace(model, (x, y), method, num_probes=32, generator=1, backend=BACKEND)
    alone = ggn_trace(model, unpadded, method, num_probes=32, generator=2, backend=BACKEND)
    assert padded.extra["n_predictions"] == alone.extra["n_predictions"] == int((y != IGNORE).sum())
    if method == "exact":
        assert padded.value == pytest.approx(alone.value, rel=1e-12)
    else:
        assert abs(padded.value - alone.value) < Z * (padded.stderr**2 + alone.stderr**2) ** 0.5


@pytest.mark.parametrize("case", [SEQ_CASES[i] for i in (0, 2, 3, 4, 6, 7)], ids=lambda c: c.id)
def test_top_ggn_eigenvalues_match_dense(case):
    model, x, y = materialise_seq(case)
    ggn_eigs = torch.linalg.eigvalsh(dense_ggn(model, x, y, loss=case.loss)).flip(0)[:2]
    r = top_eigenvalues(model, (x, y), k=2, tol=1e-10, loss=case.loss)
    torch.testing.assert_close(torch.tensor(r.extra["eigenvalues"], dtype=torch.float64), ggn_eigs, rtol=1e-7, atol=0)


# the dense Hessian is formed row by row (plain double backward, see reference.dense_hessian): small models only
@pytest.mark.parametrize("case", [SEQ_CASES[i] for i in (3, 4, 5, 6, 7)], ids=lambda c: c.id)
def test_hessian_eigenvalue_and_trace_match_dense(case):
    model, x, y = materialise_seq(case)
    hess = dense_hessian(model, x, y, loss=case.loss)
    h = top_eigenvalues(model, (x, y), k=1, matrix="hessian", tol=1e-10, loss=case.loss)
    assert h.value == pytest.approx(float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-7)
    tr = hessian_trace(model, (x, y), num_probes=32, generator=0, loss=case.loss)
    assert abs(tr.value - float(hess.trace())) < Z * tr.stderr


def test_hessian_of_the_reference_is_the_torch_loss():
    """The references differentiate the torch functional itself: ignore_index is honoured there."""
    model, x, y = materialise_seq(LM_FRESH)
    out = model(x)
    want = nn.functional.cross_entropy(out[y != IGNORE], y[y != IGNORE])
    assert float(reference_loss(out, y)) == pytest.approx(float(want), rel=1e-14)


def test_auto_never_runs_exact_on_a_large_vocabulary():
    """A 32k-token vocabulary: exact would take P·K = 3·32000 passes a batch; auto runs fisher_is."""
    torch.manual_seed(0)
    model = TinyLM(vocab=32_000, width=4, heads=1, max_len=3).double().eval()
    ids = torch.randint(1, 32_000, (2, 3), generator=torch.Generator().manual_seed(0))
    r = ggn_trace(model, (ids, ids), max_probes=8, generator=0, backend=BACKEND)
    assert r.method == "fisher_is" and "exact would take" in r.extra["auto"] and r.n_probes == 8


def test_auto_on_a_short_sequence_with_few_classes_is_exact():
    model, x, y = materialise_seq(SEQ_CASES[4])  # MSE, one 3-dim prediction a sample: P·K = 3
    r = ggn_trace(model, (x, y), loss="mse", backend=BACKEND)
    assert r.method == "exact" and "P·K = 3" in r.extra["auto"]


def test_output_fn_picks_the_logits():
    model, x, y = materialise_seq(SEQ_CASES[3])  # the tagger returns (logits, hidden): the default takes [0]
    default = exact_ggn_trace(model, (x, y), backend=BACKEND).value
    assert exact_ggn_trace(model, (x, y), backend=BACKEND, output_fn=lambda o: o[0]).value == default
    # another choice of output is honoured: the hidden state under "mse" against zero targets
    hidden = exact_ggn_trace(model, (x, torch.zeros(5, 3, 5, dtype=torch.float64)), loss="mse", backend="func",
                             output_fn=lambda o: o[1])
    assert hidden.value == pytest.approx(float(dense_ggn(model, x, torch.zeros(5, 3, 5, dtype=torch.float64),
                                                         loss="mse", output_fn=lambda o: o[1]).trace()), rel=REL)
    assert "out.weight" not in hidden.per_param or hidden.per_param["out.weight"] == 0


def test_bce_on_saturated_logits_in_float32():
    """σ(1 − σ) at logits ±40 is e^-40 ≈ 4e-18, below float32's resolution of 1 − σ: computed from
    log-sigmoids, float32 agrees with float64 and is not zero."""
    net = nn.Linear(2, 3)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[40.0, 0.0], [-40.0, 0.0], [0.0, 1.0]]))
        net.bias.zero_()
    x = torch.tensor([[1.0, 0.5], [1.0, -0.5]])
    y = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    r32 = exact_ggn_trace(net, (x, y), loss="bce")
    r64 = exact_ggn_trace(copy.deepcopy(net).double(), (x.double(), y.double()), loss="bce")
    assert r32.value == pytest.approx(r64.value, rel=1e-5)
    saturated = exact_ggn_trace(nn.Linear(2, 1), (x, y[:, :1]), loss="bce")  # sanity: a plain call runs
    assert saturated.value > 0
    with torch.no_grad():
        net.weight[2] = torch.tensor([40.0, 0.0])  # every logit saturated: Tr(G) = O(e^-40), still positive in float32
    tiny = exact_ggn_trace(net, (x, y), loss="bce")
    assert 0 < tiny.value == pytest.approx(exact_ggn_trace(copy.deepcopy(net).double(), (x.double(), y.double()),
                                                           loss="bce").value, rel=1e-5)


def test_saturated_sequences_in_float32():
    """Every position saturated (1 − p_top ≈ 2e-13, zero in float32 by subtraction): exact and fisher_is in
    float32 agree with float64, through the per-sample scaling of the signed rows."""
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), _Repeat())
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(5, 3, generator=g))
        model[0].bias.copy_(torch.tensor([30.0, 0, 0, 0, 0]))
    x, y = torch.randn(8, 3, generator=g), torch.zeros(8, 6, dtype=torch.int64)
    y[0, 3:] = IGNORE
    model64 = copy.deepcopy(model).double()
    exact64 = exact_ggn_trace(model64, (x.double(), y)).value
    assert 0 < exact64 < 1e-9
    assert exact_ggn_trace(model, (x, y)).value == pytest.approx(exact64, rel=1e-4)
    r = ggn_trace(model, (x, y), "fisher_is", num_probes=32, generator=2)
    assert r.stderr > 0 and abs(r.value - exact64) < Z * r.stderr


def test_mapping_inputs_and_dict_outputs_through_the_products():
    """model(**{"input_ids", "attention_mask"}) -> {"logits"} (the Hugging Face calling convention) gives the
    tensor-called LM's values in the parameter-space methods too (right padding: the mask changes nothing
    that is counted)."""
    plain, x, y = materialise_seq(SEQ_CASES[0])
    hf, xd, yd = materialise_seq(SEQ_CASES[1])
    assert torch.equal(xd["input_ids"], x) and torch.equal(yd, y)
    for fn, kw in ((ggn_trace, {"method": "hutchinson", "num_probes": 4, "generator": 0}),
                   (hessian_trace, {"num_probes": 4, "generator": 0}), (top_eigenvalues, {"k": 1, "tol": 1e-10})):
        a, b = fn(plain, (x, y), **kw), fn(hf, (xd, yd), **kw)
        assert b.value == pytest.approx(a.value, rel=1e-9), fn.__name__


@pytest.mark.montecarlo
def test_fisher_mc_unbiased_on_the_trained_confident_lm_given_enough_draws_off_the_top():
    """fisher_mc is unbiased on the confident LM too; it only needs far more probes: about 1 in 10 probes
    draws one label off the predicted class, so 1,024 probes give ~100 such draws (the warning's threshold
    is 30) where fisher_is needs 48 probes in all."""
    model, x, y = materialise_seq(LM_TRAINED)
    exact = exact_ggn_trace(model, (x, y), backend=BACKEND).value
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorWarning)
        r = ggn_trace(model, (x, y), "fisher_mc", num_probes=1024, generator=6, backend=BACKEND)
    assert r.extra["effective_sample_size"] > 30
    assert abs(r.value - exact) < Z * r.stderr, (r.value, exact, r.stderr)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_nan_targets_count_as_absent(loss):
    """A sample whose targets are all NaN gives the Tr(G) of the batch without it; the loss and its Hessian
    trace with the same probes likewise (float targets: NaN marks a prediction that is not counted)."""
    model, x, y = materialise_seq(next(c for c in SEQ_CASES if c.loss == loss and c.name.endswith(("padded",
                                                                                                     "labels"))))
    masked = y.clone()
    masked[2] = float("nan")
    keep = [i for i in range(y.shape[0]) if i != 2]
    a = exact_ggn_trace(model, (x, masked), loss=loss)
    b = exact_ggn_trace(model, (x[keep], y[keep]), loss=loss)
    assert a.value == pytest.approx(b.value, rel=1e-12)
    assert a.extra["n_predictions"] == b.extra["n_predictions"]
    h = hessian_trace(model, (x, masked), loss=loss, num_probes=4, generator=0)
    h_keep = hessian_trace(model, (x[keep], y[keep]), loss=loss, num_probes=4, generator=0)
    assert h.value == pytest.approx(h_keep.value, rel=1e-10)  # the same probes on the same Hessian
