"""deflated_ggn_trace (theory/DEFLATION.md) against the GGN materialised with torch.func.jacrev, float64:
the projection identity, the sketch, exactness once the sketch spans range(G), unbiasedness within a named
number of standard errors on a fresh and a memorised tiny LM (with padding) and a tiny MLP, bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from gmix_curvature.curvature._engine import make_predictions
from gmix_curvature.curvature._loss import get_loss
from gmix_curvature.curvature._model import kernel_context
from gmix_curvature.curvature._norms import PerSampleNorms
from gmix_curvature.curvature.deflated import _functional, _ggn_columns, _jvp_columns, deflated_ggn_trace, sketch_basis
from gmix_curvature.curvature.ggn import ggn_trace
from gmix_curvature.curvature.reference import dense_ggn
from gmix_curvature.curvature.sampled import fisher_is_terms
from gmix_curvature.errors import GmixError

SIGMAS = 4.0  # a stochastic estimate must lie within this many of its standard errors of the dense value
IGNORE = -100


class TinyLM(nn.Module):
    """A decoder-only LM: token + position embedding, one pre-norm causal TransformerEncoderLayer, LayerNorm,
    linear head; (N, T) tokens -> (N, T, V) logits."""

    def __init__(self, vocab: int = 5, width: int = 8, context: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.1)
        self.block = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.block(self.tok(x) + self.pos[:t], src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(h))


@dataclass(frozen=True)
class Case:
    name: str
    trained: bool
    loss: str = "cross_entropy"

    def build(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        if self.loss == "mse":
            net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
            x = torch.randn(12, 4, dtype=torch.float64)
            y = torch.randn(12, 3, dtype=torch.float64)
        elif self.name == "mlp":
            net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
            x = torch.randn(12, 4, dtype=torch.float64)
            y = torch.randint(0, 3, (12,))
        else:
            net = TinyLM().double()
            x = torch.randint(0, 5, (3, 4))
            y = (x + 1) % 5  # a function of the causal context, so that the batch can be memorised
            y[0, 2:] = IGNORE  # padding
        if self.trained:
            _memorise(net, x, y)
        return net.eval(), x, y


def _memorise(net: nn.Module, x: torch.Tensor, y: torch.Tensor, target: float = 0.99) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    with kernel_context():
        for _ in range(400):
            out = net(x)
            loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                p = torch.softmax(net(x), -1).amax(-1).reshape(-1)[y.reshape(-1) != IGNORE]
            if float(p.mean()) >= target:
                return
    raise AssertionError("the tiny model did not memorise its batch")


CASES = [Case("mlp", False), Case("lm", False), Case("lm", True), Case("mlp", False, "mse")]
IDS = [f"{c.name}-{'trained' if c.trained else 'fresh'}-{c.loss}" for c in CASES]


def dense(case: Case, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, J): G materialised by the package's jacrev reference, J (N, outputs per sample, d) by jacrev here."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    shapes = {k: p.shape for k, p in params.items()}
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts, start = {}, 0
        for k, s in shapes.items():
            parts[k] = flat[start : start + s.numel()].reshape(s)
            start += s.numel()
        return functional_call(net, (parts, dict(net.named_buffers())), (x,))

    with kernel_context():
        jac = jacrev(f)(theta).reshape(x.shape[0], -1, theta.numel())
        g = dense_ggn(net, x, y, loss=case.loss, ignore_index=IGNORE)
    return g, jac


def _flat(cols: dict[str, torch.Tensor]) -> torch.Tensor:
    k = next(iter(cols.values())).shape[0]
    return torch.cat([v.reshape(k, -1) for v in cols.values()], 1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sketch_columns_are_ggn_products(case: Case) -> None:
    net, x, y = case.build()
    g, _ = dense(case, net, x, y)
    params = {k: p.detach() for k, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    cols = {k: torch.randn((3, *p.shape), generator=gen, dtype=torch.float64) for k, p in params.items()}

    def predictions_of(out: torch.Tensor):
        return make_predictions(out, y, get_loss(case.loss), IGNORE)

    with kernel_context():
        gv = _ggn_columns(_functional(net, x, lambda o: o), params, cols, predictions_of)
    n = predictions_of(net(x)).count
    torch.testing.assert_close(_flat(gv) / n, _flat(cols) @ g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_projection_identity(case: Case) -> None:
    """‖J_iᵀv_i‖² − Σ_j ⟨J_i q_j, v_i⟩² (per-sample norms and k JVPs) = ‖(I − QQᵀ) J_iᵀ v_i‖² (dense)."""
    net, x, y = case.build()
    _, jac = dense(case, net, x, y)
    params = {k: p.detach() for k, p in net.named_parameters()}
    d = jac.shape[-1]
    q_flat, _ = torch.linalg.qr(torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    basis, start = {}, 0
    for k, p in params.items():
        basis[k] = q_flat[start : start + p.numel()].T.reshape(3, *p.shape)
        start += p.numel()
    with kernel_context():
        out, jq = _jvp_columns(_functional(net, x, lambda o: o), params, basis)
        pb = make_predictions(out, y, get_loss(case.loss), IGNORE)
        ((w, v),) = fisher_is_terms(pb, torch.Generator().manual_seed(3), {})
        psn = PerSampleNorms(net, dict(net.named_parameters()), "func")
        psn.forward(x)
        full = sum(psn.norms(v).values())
    proj = (jq.flatten(2) * v.flatten(1)).sum(-1)  # (k, N): ⟨J_i q_j, v_i⟩
    ours = w * (full - proj.square().sum(0))
    grads = torch.einsum("no,nod->nd", v.flatten(1), jac)  # J_iᵀ v_i, (N, d)
    residual = grads - grads @ q_flat @ q_flat.T
    torch.testing.assert_close(ours, w * residual.square().sum(1), rtol=1e-9, atol=1e-12)


def test_sketch_basis_is_orthonormal_and_spans_a_low_rank_range() -> None:
    a = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = a @ a.T  # rank 2
    q = sketch_basis(lambda c: {"w": c["w"] @ m}, {"w": torch.zeros(6, dtype=torch.float64)}, 4, 0)["w"]
    assert q.shape == (2, 6)  # the two numerically zero columns are dropped
    torch.testing.assert_close(q @ q.T, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(q.T @ (q @ m), m)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_once_the_sketch_spans_range_g(case: Case) -> None:
    """k ≥ rank G: the residual vanishes, so one probe returns Tr(G) to rounding."""
    net, x, y = case.build()
    g, _ = dense(case, net, x, y)
    rank = int(torch.linalg.matrix_rank(g))
    r = deflated_ggn_trace(net, (x, y), rank=rank + 4, num_probes=2, generator=0, loss=case.loss)
    truth = float(torch.trace(g))
    assert abs(r.value - truth) < 1e-8 * truth
    assert r.stderr < 1e-8 * truth
    assert abs(r.extra["captured"] - truth) < 1e-8 * truth


def test_exact_when_the_basis_is_the_whole_space() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(40, 2, dtype=torch.float64), torch.randint(0, 2, (40,))
    g, _ = dense(Case("mlp", False), net, x, y)
    d = sum(p.numel() for p in net.parameters())
    r = deflated_ggn_trace(net, (x, y), rank=d + 10, num_probes=2, generator=1)
    assert r.extra["rank"] <= d
    assert abs(r.value - float(torch.trace(g))) < 1e-9 * float(torch.trace(g))


@pytest.mark.montecarlo
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unbiased_with_a_small_sketch(case: Case) -> None:
    """rank 2 leaves most directions to the sampled residual: within SIGMAS standard errors of Tr(G)."""
    net, x, y = case.build()
    g, _ = dense(case, net, x, y)
    truth = float(torch.trace(g))
    r = deflated_ggn_trace(net, (x, y), rank=2, num_probes=200, generator=7, loss=case.loss)
    assert r.extra["captured_fraction"] < 0.999  # the residual is really sampled
    assert abs(r.value - truth) < SIGMAS * r.stderr, (r.value, truth, r.stderr)
    per_param_sum = sum(r.per_param.values())  # undeflated fisher_is blocks: unbiased as well
    per_param_se = math.sqrt(sum(s**2 for s in r.per_param_stderr.values()))
    assert abs(per_param_sum - truth) < SIGMAS * max(per_param_se, 1e-12) * math.sqrt(len(r.per_param))


def test_target_and_batches() -> None:
    """A target stops the probes; batch_size splits the data without changing the estimand."""
    case = Case("lm", False)
    net, x, y = case.build()
    g, _ = dense(case, net, x, y)
    r = deflated_ggn_trace(net, (x, y), rank=3, batch_size=2, generator=3, target_rel_stderr=0.05, max_probes=400)
    assert r.n_probes >= 8 and (r.rel_stderr <= 0.05 or r.n_probes == 400)
    assert r.n_samples == 3 and r.extra["n_predictions"] == int((y != IGNORE).sum())
    assert abs(r.value - float(torch.trace(g))) < SIGMAS * r.stderr


BAD = [
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"rank": -1}, "rank must be an int >= 0"),
    ({"y": torch.zeros(3, 3, dtype=torch.int64)}, "do not match logits"),
    ({"y": torch.full((3, 4), IGNORE)}, "every label is ignore_index"),
    ({"y": torch.full((3, 4), 7)}, "labels out of range: found 7..7 for a model with 5 outputs"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=["loss", "rank", "shape", "all-ignored", "range"])
def test_bad_input(kwargs: dict, match: str) -> None:
    net, x, y = Case("lm", False).build()
    y = kwargs.pop("y", y)
    with pytest.raises(GmixError, match=match):
        deflated_ggn_trace(net, (x, y), **({"rank": 2, "num_probes": 2, "generator": 0} | kwargs))


@pytest.mark.montecarlo
def test_auto_deflates_where_fisher_is_would_need_many_passes() -> None:
    """A vocabulary of 130 over 8 positions: exact would take P·K = 1,040 > 1,024 passes a batch, and the
    pilot predicts far more than AUTO_DEFLATE_MIN_PASSES fisher_is passes to 1 %: auto deflates, and agrees
    with a long plain fisher_is run within SIGMAS combined standard errors."""
    torch.manual_seed(0)
    net = TinyLM(vocab=130, width=4, context=8).double().eval()
    x = torch.randint(0, 130, (3, 8), generator=torch.Generator().manual_seed(0))
    y = (x + 1) % 130
    r = ggn_trace(net, (x, y), target_rel_stderr=0.01, generator=0)
    assert r.method == "fisher_is_deflated" and f"fisher_is_deflated, rank {r.extra['rank']}" in r.extra["auto"]
    assert r.extra["rank"] >= 8 and r.rel_stderr <= 0.01 and r.extra["pilot_passes"] == 8
    plain = ggn_trace(net, (x, y), "fisher_is", num_probes=200, generator=1)
    assert abs(r.value - plain.value) < SIGMAS * math.hypot(r.stderr, plain.stderr)
