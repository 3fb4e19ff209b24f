"""The simulation suite of ``gmix theory``: every closed form of :mod:`gmix_curvature.theory` held against
simulation, and the paper's statements as printed held against the same measurements.

Each check yields :class:`Check` rows: a statement, where it comes from (``"toolkit"`` for the corrected
forms, ``"paper"`` for a statement as printed), the expected value, the measured value with its
confidence half-width (``Z_SCORE`` standard errors), a verdict, and the verdict the toolkit expects —
the paper's slips are expected to be refuted. The items of issue 5:

1. weights: E[γ_t], Var[γ_t], E[(Σπ_b)²] by sampling; ``second_moment`` against exact enumeration of
   data indices and Rademacher signs.
2. the second moment on a real model: per-sample gradients of a digits CNN at a fixed θ, many batches
   and weights; measured E‖g‖² vs :func:`~gmix_curvature.theory.second_moment` vs Eq. 18 as printed.
3. the trace link (Eq. 9-10) by simulation, and Tr(AᵀA)/n (empirical Fisher) beside Tr(G).
4. Theorem 1 on the noisy quadratic model: Lemma 1 and 2, the bound's algebra, the step-size condition,
   a grid of (η, μ, B, κ) with seeds, and the exponents of T, B and γ̄.
5. critical batch size: steps to a target loss vs B for several γ̄, S(B) = S_min(1 + B_noise/B) fitted,
   and the gradient noise scale of the CNN with and without mixing.

Randomness: one ``torch.Generator`` per check, seeded from the run's seed; the global RNG is never touched.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gmix_curvature.noise import NoiseKind, expected_gamma, kappa_from_ratio
from gmix_curvature.theory import (
    NoisyQuadratic,
    critical_batch_fit,
    eq18_second_moment,
    expected_mixed_gradient_norm,
    expected_weight_sum_sq,
    expected_zeta,
    gamma_variance,
    mixed_gradient_norm_variance,
    mixed_noise_scale,
    mixed_noise_trace,
    per_sample_gradients,
    second_moment,
    theorem1_batch_condition,
    theorem1_bound,
    theorem1_rate,
    theorem1_step_limit,
    theorem1_tuned_step,
)

__all__ = [
    "Z_SCORE",
    "RESOLVE_SE",
    "EXACT_RTOL",
    "EXPONENT_TOL",
    "Verdict",
    "Check",
    "Preset",
    "PRESETS",
    "TheoryReport",
    "sample_weight_matrix",
    "simulate_nesterov",
    "nesterov_aux_sequence",
    "train_digits_cnn",
    "run_theory_checks",
    "plot_report",
]

Z_SCORE = 4.0
"""A measurement agrees with a closed form when they differ by at most this many standard errors."""
RESOLVE_SE = 2 * Z_SCORE
"""A slip of the paper is expected to show when its predicted size is at least this many standard errors: the
measurement then lands more than ``Z_SCORE`` standard errors from the printed value but for a ≥ 4σ fluctuation."""
EXACT_RTOL = 1e-9
"""Relative tolerance for deterministic (float64) comparisons."""
EXPONENT_TOL = 0.05
"""Largest |fitted − theorem| exponent difference that counts as agreement."""


class Verdict(str, Enum):
    """What a measurement says about a statement."""

    AGREES = "agrees"
    DISAGREES = "disagrees"
    HOLDS = "holds"
    VIOLATED = "violated"
    INFO = "info"


@dataclass
class Check:
    """One row of the table: ``statement`` checked against a measurement.

    ``ci`` is the half-width of the confidence interval (``Z_SCORE`` standard errors), ``None`` for exact
    values; ``expect`` the verdict the toolkit expects (a slip of the paper is expected to be refuted);
    ``ref`` points at the equation or THEORY.md section.
    """

    item: int
    name: str
    statement: str
    source: str
    expected: float | str
    measured: float | str
    ci: float | None
    verdict: Verdict
    expect: Verdict
    ref: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict == self.expect

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"], d["expect"], d["ok"] = self.verdict.value, self.expect.value, self.ok
        for k in ("expected", "measured", "ci"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d


def _agree(expected: float, measured: float, se: float, *, item: int, name: str, statement: str, source: str,
           expect: Verdict, ref: str = "", detail: dict | None = None) -> Check:
    if se > 0:
        ok = abs(measured - expected) <= Z_SCORE * se
    else:
        ok = abs(measured - expected) <= EXACT_RTOL * max(abs(expected), abs(measured), 1e-300)
    return Check(item, name, statement, source, float(expected), float(measured), Z_SCORE * se if se > 0 else None,
                 Verdict.AGREES if ok else Verdict.DISAGREES, expect, ref, detail or {})


def _resolvable(row: Check, gap: float, se: float) -> Check:
    """A slip of size ``gap`` is expected to show only when it is well beyond the noise: expect a disagreement
    beyond ``RESOLVE_SE`` standard errors, agreement below Z_SCORE/2, and accept either in between."""
    if abs(gap) <= 0.5 * Z_SCORE * se:
        row.expect = Verdict.AGREES
    elif abs(gap) <= RESOLVE_SE * se:
        row.expect = row.verdict
    row.detail["gap"], row.detail["se"] = gap, se
    return row


def _slip_or_info(row: Check, gap: float, se: float) -> Check:
    """A slip whose size ``gap`` and standard error ``se`` are known from closed forms before measuring: expect
    the row's disagreement when |gap| ≥ ``RESOLVE_SE``·se, otherwise make it an ``info`` row (the draws
    cannot resolve the slip) that reports the predicted gap and what the verdict would have been."""
    row.detail.update({"gap": gap, "se": se, "gap_in_se": abs(gap) / se if se > 0 else math.inf,
                       "resolvable": abs(gap) >= RESOLVE_SE * se})
    if not row.detail["resolvable"]:
        row.detail["verdict_if_checked"] = row.verdict.value
        row.verdict = row.expect = Verdict.INFO
        row.statement += (f" — not resolvable here: predicted gap {gap:.3g} = {abs(gap) / se:.2g} SE "
                          f"< {RESOLVE_SE:g} SE, reported only")
    return row


# ------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """The sizes of one run of the suite; ``micro`` is for the test suite, ``fast`` runs in under two minutes
    on two cores, ``full`` is larger everywhere."""

    name: str
    # item 1
    weight_draws: int = 20_000
    weight_batch: int = 16
    # items 2-3 and 5 (the CNN)
    cnn_width: int = 16
    cnn_samples: int | None = None  # digits train subset (None: all 1,437)
    cnn_steps: int = 20  # Adam steps at lr 1e-2 (partly trained: ‖∇f‖² well above zero)
    cnn_steps_trained: int | None = None  # also check a fully trained CNN
    mc_draws: int = 100_000
    mc_batch_sizes: tuple[int, ...] = (4, 16)
    ratio: float = 2.0  # r = κB of the mixing weights
    trace_draws: int = 2_000
    trace_ratio: float = 10.0
    ggn: bool = True
    # item 4
    grid_steps: int = 200
    grid_seeds: int = 128
    grid_batches: tuple[int, ...] = (1, 16)
    grid_mus: tuple[float, ...] = (0.0, 0.9)
    grid_eta_fracs: tuple[float, ...] = (0.25, 0.9)
    exp_steps: tuple[int, ...] = (2_000, 8_000, 32_000)
    exp_batches: tuple[int, ...] = (1, 4, 16)
    exp_ratios: tuple[float, ...] = (0.0, 2.0, 4.0)
    # item 5
    cbs_batches: tuple[int, ...] = tuple(2**k for k in range(15))
    cbs_gammas: tuple[int, ...] = (1, 2, 4, 16)  # γ̄ = 1 + r², powers of two so that γ̄·B stays on the grid
    cbs_etas: int = 300


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        "micro", weight_draws=4_000, weight_batch=8, cnn_width=8, cnn_samples=300, cnn_steps=20, mc_draws=60_000,
        mc_batch_sizes=(4,), trace_draws=1_000, ggn=True, grid_steps=60, grid_seeds=64, grid_batches=(1, 16),
        grid_mus=(0.0, 0.5), grid_eta_fracs=(0.5,), exp_steps=(1_000, 4_000), exp_batches=(1, 8), exp_ratios=(0.0, 3.0),
        cbs_batches=tuple(2**k for k in range(0, 13)), cbs_gammas=(1, 4), cbs_etas=120,
    ),
    "fast": Preset("fast"),
    "full": Preset(
        "full", weight_draws=100_000, cnn_steps_trained=200, mc_draws=500_000, mc_batch_sizes=(1, 4, 16, 32),
        trace_draws=8_000, grid_steps=400, grid_seeds=512, grid_batches=(1, 4, 64), grid_mus=(0.0, 0.5, 0.9),
        grid_eta_fracs=(0.1, 0.5, 0.9), exp_steps=(2_000, 8_000, 32_000, 128_000), exp_batches=(1, 4, 16, 64),
        exp_ratios=(0.0, 1.0, 2.0, 4.0), cbs_batches=tuple(2**k for k in range(17)), cbs_gammas=(1, 2, 4, 16, 64),
        cbs_etas=600,
    ),
}


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[preset]


# ------------------------------------------------------------------------------------------ samplers


def sample_weight_matrix(
    kind: str | NoiseKind, batch_size: int, kappa: float, num: int, generator: torch.Generator
) -> torch.Tensor:
    """``num`` independent weight vectors of Eq. 12 at once, a (num, batch_size) float64 tensor.

    The same distributions as :func:`gmix_curvature.noise.sample_weights` (which draws one vector per
    call), vectorised for simulation; Dirichlet draws use numpy seeded from ``generator``.

    >>> w = sample_weight_matrix("rademacher", 4, 0.1, 3, torch.Generator().manual_seed(0))
    >>> tuple(w.shape), bool(((w - 0.25).abs() - 0.1).abs().max() < 1e-12)
    ((3, 4), True)
    """
    kind = NoiseKind.parse(kind)
    mean = 1.0 / batch_size
    if kind is NoiseKind.NONE or kappa == 0.0:
        return torch.full((num, batch_size), mean, dtype=torch.float64)
    if kind is NoiseKind.GAUSSIAN:
        return mean + kappa * torch.randn(num, batch_size, generator=generator, dtype=torch.float64)
    if kind is NoiseKind.RADEMACHER:
        eps = torch.randint(0, 2, (num, batch_size), generator=generator).to(torch.float64) * 2 - 1
        return mean + kappa * eps
    alpha = ((batch_size - 1) / (batch_size**2 * kappa**2) - 1.0) / batch_size
    if batch_size < 2 or alpha <= 0:
        raise ValueError(f"dirichlet weights cannot reach kappa={kappa:g} at batch_size={batch_size}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(batch_size, alpha), size=num))


def simulate_nesterov(
    problem: NoisyQuadratic,
    *,
    eta: float,
    mu: float,
    steps: int,
    kind: str | NoiseKind,
    batch_size: int,
    kappa: float,
    seeds: int,
    generator: torch.Generator,
    record: bool = False,
) -> dict[str, torch.Tensor]:
    """Run Eq. 13 (SGD + Nesterov momentum + sample-wise GradientMix, v_0 = 0) on the noisy quadratic, ``seeds``
    independent runs side by side.

    Each step draws π (Eq. 12) and B per-sample gradients ∇f(θ_{t+½}) + ξ_b; their mix is
    (Σπ_b)∇f + Σπ_bξ_b, and Σπ_bξ_b given π is N(0, ζΣ), which is how it is drawn (exact in
    distribution, B times cheaper). Returns per seed the mean over t < T of ‖∇f(θ_{t+½})‖²
    (``avg_grad_norm_sq``), and with ``record`` the iterates θ_{t+½} − θ*, θ_t − θ*, v_t and g_{t+½}
    (arrays (T, seeds, d)) for the checks of Lemma 1 and 2.
    """
    h, noise, e0 = (torch.as_tensor(a) for a in problem.arrays())
    e = e0.expand(seeds, -1).clone()
    v = torch.zeros_like(e)
    acc = torch.zeros(seeds, dtype=torch.float64)
    sqrt_noise = noise.sqrt()
    rec: dict[str, list[torch.Tensor]] = {"x": [], "e": [], "v": [], "g": []}
    with np.errstate(over="ignore"):
        for _ in range(steps):
            x = e + mu * v
            acc += (h * x).square().sum(1)
            pi = sample_weight_matrix(kind, batch_size, kappa, seeds, generator)
            s, zeta = pi.sum(1, keepdim=True), pi.square().sum(1, keepdim=True)
            g = s * h * x + zeta.sqrt() * sqrt_noise * torch.randn(e.shape, generator=generator, dtype=torch.float64)
            if record:
                rec["x"].append(x)
                rec["e"].append(e)
                rec["v"].append(v)
                rec["g"].append(g)
            v = mu * v - eta * g
            e = e + v
    out = {"avg_grad_norm_sq": acc / steps}
    if record:
        out.update({k: torch.stack(val) for k, val in rec.items()})
    return out


def nesterov_aux_sequence(x: torch.Tensor, g: torch.Tensor, eta: float, mu: float) -> torch.Tensor:
    """The auxiliary sequence y_t of Eq. 20 (Lin et al. 2020) from θ_{t+½} (``x``) and g_{t+½} (``g``), t = 0..T−1.

    y_0 = θ_{½} = θ_0 (v_0 = 0); y_t = θ_{t+½}/(1−μ) − μθ_{t−½}/(1−μ) + ημ g_{t−½}/(1−μ) for t ≥ 1.

    >>> x = torch.tensor([[1.0], [0.5]]); g = torch.tensor([[1.0], [0.0]])
    >>> nesterov_aux_sequence(x, g, eta=0.5, mu=0.0).flatten().tolist()
    [1.0, 0.5]
    """
    y = torch.empty_like(x)
    y[0] = x[0]
    y[1:] = (x[1:] - mu * x[:-1] + eta * mu * g[:-1]) / (1 - mu)
    return y


# ------------------------------------------------------------------------------------------ the CNN


def train_digits_cnn(
    steps: int, *, width: int = 16, num_samples: int | None = None, seed: int = 0, lr: float = 1e-2
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A digits CNN after ``steps`` full-batch Adam steps on the digits train split, in eval mode and float64.

    Deterministic given ``seed`` (initialisation from a local generator). Returns (model, (x, y)).
    """
    from gmix_curvature.data import load_dataset
    from gmix_curvature.models import build_model

    ds = load_dataset("digits", "train")
    if num_samples is not None:
        ds = ds.subset(num_samples, torch.Generator().manual_seed(seed))
    x, y = ds.tensors()
    model = build_model("digits_cnn", num_classes=ds.num_classes, input_shape=ds.input_shape, width=width)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():  # conv and linear layers drawn from the local generator (PyTorch's bounds)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(mod.weight[0].numel())
                for p in (mod.weight, mod.bias):
                    if p is not None:
                        p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
    params = list(model.parameters())
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    model.train()
    for t in range(1, steps + 1):  # Adam (Kingma & Ba 2015), written out: no optimizer machinery to import
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g1, a, b in zip(params, grads, m1, m2):
                a.mul_(beta1).add_(g1, alpha=1 - beta1)
                b.mul_(beta2).addcmul_(g1, g1, value=1 - beta2)
                p.sub_(lr * (a / (1 - beta1**t)) / ((b / (1 - beta2**t)).sqrt() + eps))
    model.eval()
    return model.double(), (x.double(), y)


@dataclass
class _ModelStats:
    label: str
    A: torch.Tensor  # (n, d) per-sample gradients, float64
    K: torch.Tensor  # (n, n) Gram matrix A Aᵀ
    mean: torch.Tensor
    grad_norm_sq: float
    sigma_sq: float
    loss: float
    accuracy: float


def _model_stats(label: str, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> _ModelStats:
    x, y = data
    A = per_sample_gradients(model, x, y).to(torch.float64)
    mean = A.mean(0)
    g2 = float(mean @ mean)
    sigma_sq = float((A - mean).square().sum(1).mean())
    with torch.no_grad():
        out = model(x)
        loss = float(nn.functional.cross_entropy(out, y))
        acc = float((out.argmax(1) == y).double().mean())
    return _ModelStats(label, A, A @ A.T, mean, g2, sigma_sq, loss, acc)


# ----------------------------------------------------------------------------------------- item 1


def check_weights(p: Preset, generator: torch.Generator) -> list[Check]:
    """E[γ_t], Var[γ_t] and E[(Σπ_b)²] by sampling; ``second_moment`` against exact enumeration."""
    rows: list[Check] = []
    B, r = p.weight_batch, 2.0
    for kind in ("gaussian", "rademacher", "dirichlet"):
        kappa = kappa_from_ratio(r if kind != "dirichlet" else 1.0, B)
        pi = sample_weight_matrix(kind, B, kappa, p.weight_draws, generator)
        gam = B * pi.square().sum(1)
        s2 = pi.sum(1).square()
        n = p.weight_draws
        rows.append(_agree(expected_gamma(kind, B, kappa), float(gam.mean()), float(gam.std()) / math.sqrt(n),
                           item=1, name=f"gamma_bar/{kind}", statement=f"E[γ_t] = 1 + B²κ² ({kind}, B={B})",
                           source="toolkit", expect=Verdict.AGREES, ref="Section 3, noise.expected_gamma"))
        dev = (gam - gam.mean()).square()
        var_se = float(dev.std()) / math.sqrt(n)
        rows.append(_agree(gamma_variance(kind, B, kappa), float(dev.mean()) * n / (n - 1), var_se,
                           item=1, name=f"gamma_var/{kind}", statement=f"Var[γ_t] closed form ({kind}, B={B})",
                           source="toolkit", expect=Verdict.AGREES, ref="theory.gamma_variance"))
        rows.append(_agree(expected_weight_sum_sq(kind, B, kappa), float(s2.mean()),
                           float(s2.std()) / math.sqrt(n) if kind != "dirichlet" else 0.0, item=1,
                           name=f"sum_sq/{kind}", statement=f"E[(Σπ_b)²] = {'1 + Bκ²' if kind != 'dirichlet' else '1'} "
                           f"({kind}, B={B})", source="toolkit", expect=Verdict.AGREES, ref="corrected Eq. 18"))
    # exact enumeration: n data vectors, all n^B index tuples, all 2^B Rademacher sign patterns
    exact = rademacher_enumeration(n=3, batch_size=4, kappa=0.3, dim=2, generator=generator)
    rows.append(_agree(exact["closed_form"], exact["enumerated"], 0.0, item=1, name="second_moment/enumeration",
                       statement="second_moment = E‖g‖² by enumerating 3⁴ batches × 2⁴ sign patterns",
                       source="toolkit", expect=Verdict.AGREES, ref="corrected Eq. 18"))
    rows.append(_agree(exact["eq18"], exact["enumerated"], 0.0, item=1, name="eq18/enumeration",
                       statement="Eq. 18 as printed = E‖g‖² (same enumeration)", source="paper",
                       expect=Verdict.DISAGREES, ref="Eq. 18; THEORY.md §2"))
    return rows


def rademacher_enumeration(
    *, n: int, batch_size: int, kappa: float, dim: int, generator: torch.Generator
) -> dict[str, float]:
    """E‖Σ_b π_b g_b‖² exactly, by enumerating all n^B batches (with replacement) and 2^B Rademacher signs of
    random data vectors, beside :func:`second_moment` and :func:`eq18_second_moment` for the same data."""
    data = torch.randn(n, dim, generator=generator, dtype=torch.float64) + 1.0
    mean = data.mean(0)
    g2 = float(mean @ mean)
    s2 = float((data - mean).square().sum(1).mean())
    total = 0.0
    for idx in itertools.product(range(n), repeat=batch_size):
        rows = data[list(idx)]
        for signs in itertools.product((-1.0, 1.0), repeat=batch_size):
            pi = 1.0 / batch_size + kappa * torch.tensor(signs, dtype=torch.float64)
            g = pi @ rows
            total += float(g @ g)
    enumerated = total / (n**batch_size * 2**batch_size)
    return {
        "enumerated": enumerated,
        "closed_form": second_moment("rademacher", batch_size, kappa, g2, s2),
        "eq18": eq18_second_moment("rademacher", batch_size, kappa, g2, s2),
        "grad_norm_sq": g2,
        "sigma_sq": s2,
    }


# ----------------------------------------------------------------------------------------- item 2


def _mc_second_moment(st: _ModelStats, kind: str, B: int, kappa: float, draws: int, g: torch.Generator,
                      chunk: int = 20_000) -> dict[str, float]:
    n = st.A.shape[0]
    u = st.A @ st.mean  # ⟨a_i, ∇f⟩
    sq, dev = [], []
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        idx = torch.randint(0, n, (m, B), generator=g)
        pi = sample_weight_matrix(kind, B, kappa, m, g)
        kb = st.K[idx[:, :, None], idx[:, None, :]]
        norm2 = torch.einsum("mb,mbc,mc->m", pi, kb, pi)
        cross = (pi * u[idx]).sum(1)
        sq.append(norm2)
        dev.append(norm2 - 2 * cross + st.grad_norm_sq)
    sq_t, dev_t = torch.cat(sq), torch.cat(dev)
    return {"mean": float(sq_t.mean()), "se": float(sq_t.std()) / math.sqrt(draws),
            "dev_mean": float(dev_t.mean()), "dev_se": float(dev_t.std()) / math.sqrt(draws)}


def check_second_moment(p: Preset, stats: list[_ModelStats], g: torch.Generator) -> tuple[list[Check], list[dict]]:
    """Item 2: measured E‖g‖² on the CNN's per-sample gradients vs the exact form vs Eq. 18 as printed."""
    rows, table = [], []
    for st in stats:
        for B in p.mc_batch_sizes:
            for kind in ("none", "gaussian", "rademacher", "dirichlet"):
                if kind == "dirichlet" and B < 2:
                    continue
                r = p.ratio if kind != "dirichlet" else min(p.ratio, 0.5 * math.sqrt(B - 1))
                kappa = 0.0 if kind == "none" else kappa_from_ratio(r, B)
                mc = _mc_second_moment(st, kind, B, kappa, p.mc_draws, g)
                exact = second_moment(kind, B, kappa, st.grad_norm_sq, st.sigma_sq)
                printed = eq18_second_moment(kind, B, kappa, st.grad_norm_sq, st.sigma_sq)
                noise = mixed_noise_trace(kind, B, kappa, st.grad_norm_sq, st.sigma_sq)
                random_sum = kind in ("gaussian", "rademacher")
                tag = f"{st.label}/{kind}/B={B}"
                rows.append(_agree(exact, mc["mean"], mc["se"], item=2, name=f"second_moment/{tag}",
                                   statement=f"E‖g‖² = E[(Σπ)²]‖∇f‖² + (γ̄/B)σ² ({kind}, B={B}, r={r:g}, {st.label})",
                                   source="toolkit", expect=Verdict.AGREES, ref="corrected Eq. 18"))
                if random_sum:
                    row = _agree(printed, mc["mean"], mc["se"], item=2, name=f"eq18/{tag}",
                                 statement=f"E‖g‖² = ‖∇f‖² + (γ̄/B)σ² as Eq. 18 prints ({kind}, B={B}, {st.label})",
                                 source="paper", expect=Verdict.DISAGREES, ref="Eq. 18; THEORY.md §2")
                    rows.append(_resolvable(row, exact - printed, mc["se"]))
                    row = _agree(expected_zeta(kind, B, kappa) * st.sigma_sq, mc["dev_mean"], mc["dev_se"],
                                 item=2, name=f"eq30/{tag}",
                                 statement=f"E‖g − ∇f‖² = E[ζ]σ² as Eq. 27-30 print ({kind}, B={B}, {st.label})",
                                 source="paper", expect=Verdict.DISAGREES, ref="Appendix B.1, Eq. 30")
                    rows.append(_resolvable(row, exact - printed, mc["dev_se"]))
                    rows.append(_agree(noise, mc["dev_mean"], mc["dev_se"], item=2, name=f"noise_trace/{tag}",
                                       statement=f"E‖g − ∇f‖² = E[ζ]σ² + Bκ²‖∇f‖² ({kind}, B={B}, {st.label})",
                                       source="toolkit", expect=Verdict.AGREES, ref="theory.mixed_noise_trace"))
                table.append({"model": st.label, "kind": kind, "batch_size": B, "ratio": r if kind != "none" else 0.0,
                              "kappa": kappa, "grad_norm_sq": st.grad_norm_sq, "sigma_sq": st.sigma_sq,
                              "measured": mc["mean"], "se": mc["se"], "exact": exact, "eq18": printed,
                              "noise_measured": mc["dev_mean"], "noise_se": mc["dev_se"], "noise_exact": noise})
    return rows, table


# ----------------------------------------------------------------------------------------- item 3


def check_trace_link(p: Preset, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], st: _ModelStats,
                     g: torch.Generator) -> tuple[list[Check], dict]:
    """Item 3: E‖Az̃‖² = ‖Az‖² + κ²Tr(AᵀA) by simulation (Eq. 9-10); Tr(AᵀA)/n beside Tr(G)."""
    rows = []
    n = st.A.shape[0]
    az2 = st.grad_norm_sq  # ‖Az‖², z = 1/n
    tr = float(st.K.trace())
    kappa = kappa_from_ratio(p.trace_ratio, n)
    info: dict[str, Any] = {"n": n, "kappa": kappa, "mean_norm_sq": az2, "trace_ata": tr}
    for kind in ("gaussian", "rademacher", "dirichlet"):
        z = sample_weight_matrix(kind, n, kappa, p.trace_draws, g)
        q = ((z @ st.K) * z).sum(1)
        exp = expected_mixed_gradient_norm(kind, n, kappa, az2, tr)
        se = float(q.std()) / math.sqrt(p.trace_draws)
        stmt = ("E‖Az̃‖² = ‖Az‖² + κ²Tr(AᵀA)" if kind != "dirichlet"
                else "E‖Az̃‖² = ‖Az‖² + κ²n/(n−1)(Tr(AᵀA) − n‖Az‖²)")
        rows.append(_agree(exp, float(q.mean()), se, item=3, name=f"trace_link/{kind}/{st.label}",
                           statement=f"{stmt} ({kind}, n={n}, r={p.trace_ratio:g})", source="toolkit",
                           expect=Verdict.AGREES, ref="Eq. 9-10; theory.expected_mixed_gradient_norm"))
        if kind == "gaussian":
            # the slip is the dropped ‖Az‖² = ‖∇f‖²; whether D draws resolve it follows from the closed forms
            se_pred = math.sqrt(mixed_gradient_norm_variance(kind, st.K, kappa) / p.trace_draws)
            row = _agree(kappa**2 * tr, float(q.mean()), se, item=3, name=f"hutchinson_only/gaussian/{st.label}",
                         statement=f"E‖Az̃‖² = κ²Tr(AᵀA) (Hutchinson, ignoring E[z̃] = z; {st.label})",
                         source="paper", expect=Verdict.DISAGREES, ref="Eq. 9-10; THEORY.md §3")
            rows.append(_slip_or_info(row, exp - kappa**2 * tr, se_pred))
            info["trace_link_se_predicted"] = se_pred
        info[f"measured_{kind}"] = float(q.mean())
    ef = tr / n
    info["empirical_fisher_trace"] = ef
    if p.ggn:
        from gmix_curvature.curvature import empirical_fisher_trace, ggn_trace

        tg = ggn_trace(model, data, method="exact").value
        ef_curv = empirical_fisher_trace(model, data).value
        info["ggn_trace"] = tg
        rows.append(_agree(ef_curv, ef, 0.0, item=3, name=f"empirical_fisher/crosscheck/{st.label}",
                           statement="Tr(AᵀA)/n (vmap per-sample gradients) = curvature.empirical_fisher_trace",
                           source="toolkit", expect=Verdict.AGREES, ref="Eq. 10"))
        rows.append(_agree(tg, ef, 0.0, item=3, name=f"eq11_is_ggn/{st.label}",
                           statement=f"Tr(AᵀA)/n = Tr(G) (Eq. 11 read as the GGN; {st.label}, ratio {ef / tg:.3g})",
                           source="paper", expect=Verdict.DISAGREES, ref="Eq. 11; THEORY.md §3"))
    return rows, info


# ----------------------------------------------------------------------------------------- item 4


def check_lemmas(g: torch.Generator) -> list[Check]:
    """Lemma 1 (corrected and as printed) and Lemma 2 on a simulated Nesterov trajectory (float64)."""
    q = NoisyQuadratic.standard(dim=8, condition=10.0)
    eta, mu = 0.05, 0.9
    sim = simulate_nesterov(q, eta=eta, mu=mu, steps=200, kind="gaussian", batch_size=4, kappa=0.5, seeds=4,
                            generator=g, record=True)
    x, gg, v = sim["x"], sim["g"], sim["v"]
    y = nesterov_aux_sequence(x, gg, eta, mu)
    inc = y[1:] - y[:-1]
    scale = float(inc.abs().max())

    def resid(coef: float) -> float:
        return float((inc - coef * gg[:-1]).abs().max()) / scale

    rows = [
        Check(4, "lemma1/corrected", "y_{t+1} − y_t = −η/(1−μ)·g_{t+½} (η=0.05, μ=0.9)", "toolkit", 0.0,
              resid(-eta / (1 - mu)), None,
              Verdict.AGREES if resid(-eta / (1 - mu)) < 1e-10 else Verdict.DISAGREES, Verdict.AGREES,
              "Lemma 1 (Lin et al. 2020, Lemma A.1); THEORY.md §4"),
        Check(4, "lemma1/printed", "y_{t+1} − y_t = −η/(1−η)·g_{t+½} as Lemma 1 prints", "paper", 0.0,
              resid(-eta / (1 - eta)), None,
              Verdict.AGREES if resid(-eta / (1 - eta)) < 1e-10 else Verdict.DISAGREES, Verdict.DISAGREES,
              "Lemma 1; THEORY.md §4"),
    ]
    # Lemma 2, and the identity y_t − θ_{t+½} = μ²/(1−μ)·v_t behind it
    lhs = float((y - x).square().sum())
    rhs = mu**4 * eta**2 / (1 - mu) ** 4 * float(gg.square().sum())
    rows.append(Check(4, "lemma2", "Σ‖y_t − θ_{t+½}‖² ≤ μ⁴η²/(1−μ)⁴·Σ‖g_{t+½}‖² (ratio lhs/rhs ≤ 1)", "paper",
                      1.0, lhs / rhs, None, Verdict.HOLDS if lhs <= rhs else Verdict.VIOLATED, Verdict.HOLDS,
                      "Lemma 2 (Lin et al. 2020, Lemma A.2)"))
    ident = float((y - x - mu**2 / (1 - mu) * v).abs().max()) / float((y - x).abs().max())
    rows.append(Check(4, "lemma2/identity", "y_t − θ_{t+½} = μ²/(1−μ)·v_t (relative residual)", "toolkit", 0.0,
                      ident, None, Verdict.AGREES if ident < 1e-10 else Verdict.DISAGREES, Verdict.AGREES,
                      "THEORY.md §4"))
    return rows


def check_bound_algebra(q: NoisyQuadratic) -> list[Check]:
    """The algebra from the telescoped inequality to Eq. 22, and the step-size condition, as numbers."""
    rows = []
    L, delta, s2 = q.L, q.delta, q.sigma_sq
    T, B, gbar, mu = 1000, 4, 5.0, 0.9
    eta = 0.01
    lhs = L * eta**2 / (2 * (1 - mu) ** 2) + L * mu * eta**2 / (2 * (1 - mu) ** 3)
    rows.append(_agree(L * eta**2 / (2 * (1 - mu) ** 3), lhs, 0.0, item=4, name="algebra/coefficients",
                       statement="Lη²/(2(1−μ)²) + Lμη²/(2(1−μ)³) = Lη²/(2(1−μ)³), so the bound's denominator has μ³+1",
                       source="paper", expect=Verdict.AGREES, ref="Appendix B, rearranged bound"))
    _, second = theorem1_rate(L=L, delta=delta, sigma_sq=s2, steps=T, mu=mu, gamma_bar=gbar, batch_size=B)
    eta_star = theorem1_tuned_step(L=L, delta=delta, sigma_sq=s2, steps=T, mu=mu, gamma_bar=gbar, batch_size=B)

    def psi(e: np.ndarray | float) -> np.ndarray | float:  # Ψ'_T of Appendix B
        return delta * (1 - mu) / (e * T) + e * L * gbar * s2 / (2 * (1 - mu) ** 2 * B)

    rows.append(_agree(second, float(psi(eta_star)), 0.0, item=4, name="algebra/eq22",
                       statement="Ψ'_T(η*) = √(2LΔσ²γ̄/(BT(1−μ))), Eq. 22's second term", source="paper",
                       expect=Verdict.AGREES, ref="Eq. 21-22"))
    grid_min = float(psi(np.geomspace(1e-3 * eta_star, 1e3 * eta_star, 100_001)).min())
    rows.append(Check(4, "algebra/eta_star", "η* = √(2Δ(1−μ)³B/(TLσ²γ̄)) minimises Ψ'_T (grid min / Ψ'_T(η*) ≥ 1)",
                      "toolkit", 1.0, grid_min / float(psi(eta_star)), None,
                      Verdict.HOLDS if grid_min >= float(psi(eta_star)) * (1 - 1e-12) else Verdict.VIOLATED,
                      Verdict.HOLDS, "theory.theorem1_tuned_step"))
    # the step-size condition at equality: the bound is infinite
    lim = theorem1_step_limit(L, mu, printed=True)
    at = theorem1_bound(L=L, delta=delta, sigma_sq=s2, steps=T, eta=lim, mu=mu, printed=True)
    rows.append(Check(4, "stepsize/equality", "Theorem 1's bound is finite for every η ≤ 2(1−μ)²/(L(μ³+1)) "
                      "(value at equality)", "paper", "finite", at, None,
                      Verdict.HOLDS if math.isfinite(at) else Verdict.VIOLATED, Verdict.VIOLATED,
                      "Theorem 1; THEORY.md §4"))
    # the step-size condition with random Σπ: B = 1, Rademacher r = 2, μ = 0, η = 1/L (inside the printed range)
    kind, Bc, kappa, muc, steps = "rademacher", 1, 2.0, 0.0, 50
    eta_c = 0.5 * theorem1_step_limit(L, muc, printed=True)
    traj = q.expected_trajectory(eta=eta_c, mu=muc, steps=steps, kind=kind, batch_size=Bc, kappa=kappa)
    measured = float(traj["grad_norm_sq"].mean())
    printed = theorem1_bound(L=L, delta=delta, sigma_sq=s2, steps=steps, eta=eta_c, mu=muc, kind=kind,
                             batch_size=Bc, kappa=kappa, printed=True)
    rows.append(Check(4, "stepsize/counterexample", "(1/T)ΣE‖∇f(θ_t+½)‖² ≤ printed bound at "
                      f"η = {eta_c:g} = half the "
                      f"printed limit (Rademacher, B=1, r=2, μ=0, T={steps}; exact)", "paper", printed, measured, None,
                      Verdict.HOLDS if measured <= printed else Verdict.VIOLATED, Verdict.VIOLATED,
                      "Theorem 1 with Eq. 18; THEORY.md §4",
                      {"corrected_limit": theorem1_step_limit(L, muc, kind, Bc, kappa),
                       "printed_limit": theorem1_step_limit(L, muc, printed=True)}))
    return rows


def _grid_configs(p: Preset) -> list[dict[str, Any]]:
    out = []
    for kind, r in (("none", 0.0), ("gaussian", p.ratio), ("rademacher", p.ratio), ("dirichlet", 1.0)):
        for B in p.grid_batches:
            if kind == "dirichlet" and B < 4:
                continue
            for mu in p.grid_mus:
                for frac in p.grid_eta_fracs:
                    out.append({"kind": kind, "ratio": r, "batch_size": B, "mu": mu, "eta_frac": frac})
    return out


def check_theorem1_grid(p: Preset, q: NoisyQuadratic, g: torch.Generator) -> tuple[list[Check], list[dict]]:
    """Item 4: the measured (1/T)ΣE‖∇f(θ_{t+½})‖² over a grid, against the exact recursion and both bounds."""
    table = []
    T = p.grid_steps
    for cfg in _grid_configs(p):
        kind, B, mu = cfg["kind"], cfg["batch_size"], cfg["mu"]
        kappa = 0.0 if kind == "none" else kappa_from_ratio(cfg["ratio"], B)
        eta = cfg["eta_frac"] * theorem1_step_limit(q.L, mu, printed=True)
        exact = float(q.expected_trajectory(eta=eta, mu=mu, steps=T, kind=kind, batch_size=B,
                                            kappa=kappa)["grad_norm_sq"].mean())
        limit = theorem1_step_limit(q.L, mu, kind, B, kappa)
        row = dict(cfg, kappa=kappa, eta=eta, steps=T, exact=exact, corrected_limit=limit,
                   corrected_bound=theorem1_bound(L=q.L, delta=q.delta, sigma_sq=q.sigma_sq, steps=T, eta=eta, mu=mu,
                                                  kind=kind, batch_size=B, kappa=kappa),
                   printed_bound=theorem1_bound(L=q.L, delta=q.delta, sigma_sq=q.sigma_sq, steps=T, eta=eta, mu=mu,
                                                kind=kind, batch_size=B, kappa=kappa, printed=True),
                   measured=math.nan, se=math.nan)
        if eta < limit:  # stable: simulate (an unstable run only overflows)
            sim = simulate_nesterov(q, eta=eta, mu=mu, steps=T, kind=kind, batch_size=B, kappa=kappa,
                                    seeds=p.grid_seeds, generator=g)["avg_grad_norm_sq"]
            row["measured"], row["se"] = float(sim.mean()), float(sim.std()) / math.sqrt(p.grid_seeds)
        table.append(row)
    sims = [r for r in table if math.isfinite(r["measured"])]
    n_mc = sum(abs(r["measured"] - r["exact"]) <= Z_SCORE * r["se"] for r in sims)
    corrected = [r for r in table if r["eta"] < r["corrected_limit"]]
    n_corr = sum(r["exact"] <= r["corrected_bound"] for r in corrected)
    printed = [r for r in table if math.isfinite(r["printed_bound"])]
    n_printed = sum(r["exact"] <= r["printed_bound"] for r in printed)
    worst = max(printed, key=lambda r: r["exact"] / r["printed_bound"])
    rows = [
        Check(4, "grid/recursion_vs_mc", f"simulated Eq. 13 = exact moment recursion within {Z_SCORE:g} SE "
              f"({len(sims)} stable configurations × {p.grid_seeds} seeds)", "toolkit", f"{len(sims)}/{len(sims)}",
              f"{n_mc}/{len(sims)}", None, Verdict.AGREES if n_mc == len(sims) else Verdict.DISAGREES, Verdict.AGREES,
              "NoisyQuadratic.expected_trajectory"),
        Check(4, "grid/corrected_bound", f"corrected bound holds wherever η < 2(1−μ)²/(L(μ³+E[(Σπ)²])) "
              f"({len(corrected)} configurations)", "toolkit", f"{len(corrected)}/{len(corrected)}",
              f"{n_corr}/{len(corrected)}", None, Verdict.HOLDS if n_corr == len(corrected) else Verdict.VIOLATED,
              Verdict.HOLDS, "THEORY.md §4"),
        Check(4, "grid/printed_bound", f"printed bound holds wherever η < 2(1−μ)²/(L(μ³+1)) ({len(printed)} "
              f"configurations; worst: {worst['kind']} B={worst['batch_size']} μ={worst['mu']:g})", "paper",
              f"{len(printed)}/{len(printed)}", f"{n_printed}/{len(printed)}", None,
              Verdict.HOLDS if n_printed == len(printed) else Verdict.VIOLATED, Verdict.VIOLATED,
              "Theorem 1, Appendix B"),
    ]
    return rows, table


def check_exponents(p: Preset, q: NoisyQuadratic, mu: float = 0.5) -> tuple[list[Check], list[dict]]:
    """Fit log of the exact (1/T)ΣE‖∇f‖² at the theorem's tuned step η* against log T, log B, log γ̄."""
    configs = []
    for T, B, r in itertools.product(p.exp_steps, p.exp_batches, p.exp_ratios):
        kappa = kappa_from_ratio(r, B)
        gbar = expected_gamma("gaussian", B, kappa)
        eta = theorem1_tuned_step(L=q.L, delta=q.delta, sigma_sq=q.sigma_sq, steps=T, mu=mu, gamma_bar=gbar,
                                  batch_size=B)
        bcond = theorem1_batch_condition(L=q.L, delta=q.delta, sigma_sq=q.sigma_sq, steps=T, mu=mu, gamma_bar=gbar)
        configs.append({"steps": T, "batch_size": B, "ratio": r, "kappa": kappa, "gamma_bar": gbar, "eta": eta,
                        "eta_limit": theorem1_step_limit(q.L, mu, "gaussian", B, kappa), "batch_condition": bcond})
    tmax = max(p.exp_steps)
    traj = q.expected_trajectory(
        eta=np.array([c["eta"] for c in configs]), mu=mu, steps=tmax,
        weight_sum_sq=np.array([expected_weight_sum_sq("gaussian", c["batch_size"], c["kappa"]) for c in configs]),
        zeta=np.array([expected_zeta("gaussian", c["batch_size"], c["kappa"]) for c in configs]),
    )["grad_norm_sq"]
    for i, c in enumerate(configs):
        c["exact"] = float(traj[i, : c["steps"]].mean())
        c["bound_rate"] = theorem1_rate(L=q.L, delta=q.delta, sigma_sq=q.sigma_sq, steps=c["steps"], mu=mu,
                                        gamma_bar=c["gamma_bar"], batch_size=c["batch_size"])[1]
    X = np.array([[1.0, math.log(c["steps"]), math.log(c["batch_size"]), math.log(c["gamma_bar"])] for c in configs])
    yv = np.log([c["exact"] for c in configs])
    coef, *_ = np.linalg.lstsq(X, yv, rcond=None)
    regime = all(c["batch_size"] <= c["batch_condition"] and c["eta"] < c["eta_limit"] for c in configs)
    rows = []
    for name, k, want in (("T", 1, -0.5), ("B", 2, -0.5), ("gamma_bar", 3, 0.5)):
        ok = abs(coef[k] - want) <= EXPONENT_TOL
        rows.append(Check(4, f"exponent/{name}", f"exponent of {name} in (1/T)ΣE‖∇f‖² at η* (exact, μ={mu:g}, "
                          f"{len(configs)} configurations, noise-dominated: {regime})", "paper", want, float(coef[k]),
                          EXPONENT_TOL, Verdict.AGREES if ok else Verdict.DISAGREES, Verdict.AGREES, "Eq. 14"))
    return rows, configs


# ----------------------------------------------------------------------------------------- item 5


def check_critical_batch(p: Preset, q: NoisyQuadratic) -> tuple[list[Check], list[dict]]:
    """Item 5: steps to a target loss vs B (plain SGD + Gaussian GradientMix, the best η per B on a grid).

    Checks that GradientMix at batch γ̄B needs the steps of plain SGD at B (the mixed noise covariance is
    (γ̄/B)Σ + (r²/B)∇f∇fᵀ), that the fitted B_noise of S(B) = S_min(1 + B_noise/B) grows like γ̄, and
    puts B_noise beside γ̄·tr Σ/‖∇f‖² + r² and Theorem 1's batch-size condition.

    The S(B) form is an approximation on this model, so a fitted B_noise depends on the window of B it is fitted
    on. The B_noise ratio is therefore checked on matched windows — W = {B : γ̄_max·B on the grid} for γ̄ = 1 and
    γ̄·W for γ̄ — within ``Z_SCORE`` standard errors of the two fits (:func:`critical_batch_fit`); the ratio on
    the whole grid, where the window effect biases it upward at large γ̄, is reported beside it as info.
    """
    target = 1e-3 * q.delta
    h, noise, e0 = q.arrays()
    table, steps, fits = [], {}, {}
    for gb in p.cbs_gammas:
        r = math.sqrt(gb - 1)
        kind = "none" if gb == 1 else "gaussian"
        steps[gb] = {}
        for B in p.cbs_batches:
            kappa = 0.0 if gb == 1 else kappa_from_ratio(r, B)
            c = expected_weight_sum_sq(kind, B, kappa)
            etas = np.geomspace(1e-6, 2.0 / (q.L * c), p.cbs_etas, endpoint=False)
            s = q.steps_to_target(target, eta=etas, weight_sum_sq=c, zeta=expected_zeta(kind, B, kappa))
            i = int(np.argmin(s))
            steps[gb][B] = float(s[i])
            table.append({"gamma_bar": gb, "ratio": r, "batch_size": B, "steps": float(s[i]), "eta": float(etas[i])})
        fits[gb] = critical_batch_fit(list(steps[gb]), list(steps[gb].values()))
    window = [B for B in p.cbs_batches if max(p.cbs_gammas) * B in steps[max(p.cbs_gammas)]]
    if len(window) < 3 or 1 not in steps:
        raise ValueError(f"preset {p.name!r}: the critical-batch check needs gamma 1 among cbs_gammas and >= 3 batch "
                         f"sizes B with max(cbs_gammas)*B on the grid, got {len(window)}")
    matched = {gb: critical_batch_fit([gb * B for B in window], [steps[gb][gb * B] for B in window])
               for gb in p.cbs_gammas}
    # the noise scale where gradient descent (largest batch, its best η) reaches the target
    eta_gd = min(row["eta"] for row in table if row["gamma_bar"] == 1 and row["batch_size"] == max(p.cbs_batches))
    t_gd = int(q.steps_to_target(target, eta=eta_gd, weight_sum_sq=1.0, zeta=0.0))
    grad = h * e0 * (1 - eta_gd * h) ** t_gd
    b_simple = float(noise.sum() / (grad @ grad))
    b_hess = float((h * noise).sum() / (grad @ (h * grad)))
    rows = []
    base, base_w = fits[1], matched[1]
    for gb, fit in fits.items():
        s_min, b_noise = fit.s_min, fit.b_noise
        r = math.sqrt(gb - 1)
        if gb != 1:
            pairs = [(steps[gb][gb * B], steps[1][B]) for B in p.cbs_batches if gb * B in steps[gb]]
            dev = max(abs(a / b - 1) for a, b in pairs)
            rows.append(Check(5, f"critical_batch/equivalence/g={gb}", f"S_γ̄(γ̄·B) = S_1(B): mixing at batch γ̄B takes "
                              f"the steps of plain SGD at B (γ̄={gb}, {len(pairs)} batch sizes; max rel. deviation "
                              f"≤ 5 %)", "toolkit", 0.0, dev, None,
                              Verdict.AGREES if dev <= 0.05 else Verdict.DISAGREES, Verdict.AGREES,
                              "corrected Eq. 18; THEORY.md §5"))
            mw = matched[gb]
            ratio = mw.b_noise / base_w.b_noise
            se = ratio * math.hypot(mw.b_noise_se / mw.b_noise, base_w.b_noise_se / base_w.b_noise)
            rows.append(_agree(float(gb), ratio, se, item=5, name=f"critical_batch/b_noise/g={gb}",
                               statement=f"fitted B_noise(γ̄) / B_noise(1) = γ̄ on matched windows (γ̄={gb}: B = "
                               f"{gb * window[0]}..{gb * window[-1]} against {window[0]}..{window[-1]}; SE from the "
                               "covariances of the two S(B) fits)", source="toolkit", expect=Verdict.AGREES,
                               ref="McCandlish et al. 2018; THEORY.md §5",
                               detail={"s_min": mw.s_min, "b_noise": mw.b_noise, "b_noise_se": mw.b_noise_se,
                                       "s_min_1": base_w.s_min, "b_noise_1": base_w.b_noise,
                                       "b_noise_1_se": base_w.b_noise_se, "window": [gb * B for B in window]}))
            whole = b_noise / base.b_noise
            whole_se = whole * math.hypot(fit.b_noise_se / b_noise, base.b_noise_se / base.b_noise)
            row = _agree(float(gb), whole, whole_se, item=5, name=f"critical_batch/b_noise_whole_grid/g={gb}",
                         statement=f"fitted B_noise(γ̄) / B_noise(1) = γ̄ with both fitted on B = "
                         f"{min(p.cbs_batches)}..{max(p.cbs_batches)} (γ̄={gb}): biased by "
                         f"{100 * (whole / ratio - 1):+.1f} % against the matched windows — S(B) = S_min(1 + "
                         "B_noise/B) is not exact on this model, and one window shows a large γ̄ only its "
                         "noise-dominated part", source="toolkit",
                         expect=Verdict.INFO, ref="THEORY.md §5",
                         detail={"bias_vs_matched": whole / ratio - 1, "ratio_matched": ratio})
            row.detail["verdict_if_checked"] = row.verdict.value
            row.verdict = Verdict.INFO
            rows.append(row)
        pred = mixed_noise_scale(b_simple, "none" if gb == 1 else "gaussian", r)
        tcond = theorem1_batch_condition(L=q.L, delta=q.delta, sigma_sq=q.sigma_sq, steps=int(round(2 * s_min)),
                                         mu=0.0, gamma_bar=gb)
        rows.append(Check(5, f"critical_batch/fit/g={gb}", f"fitted B_noise (S_min={s_min:.4g}) vs γ̄·B_simple + r² at "
                          f"the target (Hessian-weighted: {gb * b_hess:.4g}; Theorem 1's B-condition at T=2S_min: "
                          f"{tcond:.4g})", "toolkit", pred, b_noise, None, Verdict.INFO, Verdict.INFO,
                          "McCandlish et al. 2018; Remark after Theorem 1",
                          {"s_min": s_min, "b_noise": b_noise, "b_noise_se": fit.b_noise_se,
                           "b_simple_target": b_simple, "b_noise_hessian": b_hess, "theorem_batch_condition": tcond}))
    return rows, table


def check_noise_scale(p: Preset, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], st: _ModelStats,
                      second_table: list[dict]) -> list[Check]:
    """B_simple of the CNN with and without mixing; the mixed one against the measured per-step noise."""
    from gmix_curvature.theory import gradient_noise_scale

    rows = []
    res0 = gradient_noise_scale(model, data)
    rows.append(_agree(st.sigma_sq / st.grad_norm_sq, res0.b_simple, 0.0, item=5, name=f"noise_scale/{st.label}",
                       statement=f"B_simple = tr Σ/‖∇f‖² of the digits CNN ({st.label}; chunked vs dense)",
                       source="toolkit", expect=Verdict.AGREES, ref="theory.gradient_noise_scale"))
    for row in second_table:
        if row["model"] != st.label or row["kind"] not in ("gaussian", "rademacher"):
            continue
        res = gradient_noise_scale(model, data, kind=row["kind"], ratio=row["ratio"])
        B = row["batch_size"]
        measured = row["noise_measured"] * B / st.grad_norm_sq
        se = row["noise_se"] * B / st.grad_norm_sq
        rows.append(_agree(res.b_simple_mixed, measured, se, item=5,
                           name=f"noise_scale_mixed/{st.label}/{row['kind']}/B={B}",
                           statement=f"B·E‖g − ∇f‖²/‖∇f‖² = γ̄B_simple + r² ({row['kind']}, r={row['ratio']:g}, B={B})",
                           source="toolkit", expect=Verdict.AGREES, ref="theory.mixed_noise_scale"))
    return rows


# ------------------------------------------------------------------------------------------- driver


@dataclass
class TheoryReport:
    """What ``gmix theory`` found: the rows, the tables behind the plots, the preset and the timings."""

    preset: dict[str, Any]
    seed: int
    checks: list[Check]
    tables: dict[str, Any]
    seconds: dict[str, float]

    @property
    def ok(self) -> bool:
        """Every verdict is the one the toolkit expects."""
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "seed": self.seed, "ok": self.ok, "seconds": self.seconds,
                "checks": [c.to_dict() for c in self.checks], "tables": _jsonable(self.tables)}

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    def table(self) -> str:
        """One line per check: item, check, expected, measured ± CI, verdict (a ``!`` marks an unexpected one)."""
        lines = [f"{'#':<2} {'check':<44} {'source':<7} {'expected':>12} {'measured ± CI':>24}  verdict"]
        for c in self.checks:
            lines.append(f"{c.item:<2} {c.name[:44]:<44} {c.source:<7} {_fmt(c.expected):>12} "
                         f"{_fmt(c.measured) + ('' if c.ci is None else ' ± ' + _fmt(c.ci)):>24}  "
                         f"{c.verdict.value}{'' if c.ok else ' !'}")
        n_bad = sum(not c.ok for c in self.checks)
        lines.append(f"{len(self.checks)} checks, {n_bad} with an unexpected verdict; "
                     f"CI = ±{Z_SCORE:g} standard errors")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def run_theory_checks(
    preset: str | Preset = "fast", *, seed: int = 0, progress: Callable[[str], None] | None = None
) -> TheoryReport:
    """Run the whole suite (items 1-5 of issue 5) and return a :class:`TheoryReport`.

    Each item gets its own generator seeded from ``seed``, so items are reproducible on their own.
    """
    p = _preset(preset)
    say = progress or (lambda _msg: None)
    rows: list[Check] = []
    tables: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def gen(k: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1000 + k)

    t0 = time.perf_counter()
    say("item 1: weights")
    rows += check_weights(p, gen(1))
    seconds["weights"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("items 2-3: digits CNN")
    model, data = train_digits_cnn(p.cnn_steps, width=p.cnn_width, num_samples=p.cnn_samples, seed=seed)
    models = [(f"cnn@{p.cnn_steps}", model)]
    if p.cnn_steps_trained:
        trained, _ = train_digits_cnn(p.cnn_steps_trained, width=p.cnn_width, num_samples=p.cnn_samples, seed=seed)
        models.append((f"cnn@{p.cnn_steps_trained}", trained))
    stats = [_model_stats(label, m, data) for label, m in models]
    tables["models"] = [{"label": s.label, "loss": s.loss, "accuracy": s.accuracy, "grad_norm_sq": s.grad_norm_sq,
                         "sigma_sq": s.sigma_sq, "num_params": int(s.A.shape[1]), "num_samples": int(s.A.shape[0])}
                        for s in stats]
    r2, tables["second_moment"] = check_second_moment(p, stats, gen(2))
    rows += r2
    seconds["second_moment"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables["trace_link"] = []
    for (_, m), st in zip(models, stats):
        r3, info = check_trace_link(p, m, data, st, gen(3))
        rows += r3
        tables["trace_link"].append(dict(info, model=st.label))
    seconds["trace_link"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("item 4: Theorem 1")
    q = NoisyQuadratic.standard()
    tables["problem"] = {"curvatures": list(q.curvatures), "noise": list(q.noise), "L": q.L, "delta": q.delta,
                         "sigma_sq": q.sigma_sq}
    rows += check_lemmas(gen(4))
    rows += check_bound_algebra(q)
    r4, tables["theorem1_grid"] = check_theorem1_grid(p, q, gen(5))
    rows += r4
    r4e, tables["exponents"] = check_exponents(p, q)
    rows += r4e
    seconds["theorem1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("item 5: critical batch size")
    r5, tables["critical_batch"] = check_critical_batch(p, q)
    rows += r5
    for (_, m), st in zip(models, stats):
        rows += check_noise_scale(p, m, data, st, tables["second_moment"])
    seconds["critical_batch"] = time.perf_counter() - t0
    return TheoryReport({f.name: getattr(p, f.name) for f in fields(p)}, seed, rows, tables, seconds)


def plot_report(report: TheoryReport, out: str | Path) -> list[Path]:
    """Seaborn figures of the report under ``out``; returns the files written.

    Drawn on :class:`matplotlib.figure.Figure` objects (seaborn's axes-level functions, its style as a
    context): matplotlib's backend, pyplot's figures and the global rcParams are left as they were.
    """
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def save(fig: Figure, name: str) -> None:
        files.append(out / name)
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")

    with sns.axes_style("whitegrid"):
        df = pd.DataFrame(report.tables["second_moment"])
        if len(df):
            long = df.melt(id_vars=["model", "kind", "batch_size"], value_vars=["measured", "exact", "eq18"],
                           var_name="value", value_name="E|g|^2")
            models, batches = list(dict.fromkeys(long["model"])), sorted(set(long["batch_size"]))
            fig = Figure(figsize=(4.2 * len(batches), 3.2 * len(models)), layout="constrained")
            axes = fig.subplots(len(models), len(batches), squeeze=False)
            for i, model in enumerate(models):
                for j, batch in enumerate(batches):
                    sub = long[(long["model"] == model) & (long["batch_size"] == batch)]
                    sns.barplot(data=sub, x="kind", y="E|g|^2", hue="value", ax=axes[i, j],
                                legend=i == 0 and j == len(batches) - 1)
                    axes[i, j].set_title(f"model = {model} | batch_size = {batch}", fontsize=9)
            sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1))
            fig.suptitle("E‖g‖²: Monte Carlo vs exact vs Eq. 18 as printed")
            save(fig, "second_moment.png")

        df = pd.DataFrame(report.tables["theorem1_grid"])
        if len(df):
            fig = Figure(figsize=(5.5, 4.5))
            ax = fig.subplots()
            long = df.melt(id_vars=["exact", "kind"], value_vars=["corrected_bound", "printed_bound"],
                           var_name="bound", value_name="bound value")
            long = long[np.isfinite(long["bound value"].astype(float))]
            sns.scatterplot(data=long, x="bound value", y="exact", hue="bound", style="kind", ax=ax)
            lo = float(min(long["bound value"].min(), df["exact"].min()))
            hi = float(max(long["bound value"].max(), df["exact"].min() * 10))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set(xscale="log", yscale="log", title="Theorem 1: (1/T)ΣE‖∇f‖² vs bound (above the line: violated)")
            save(fig, "theorem1_grid.png")

        df = pd.DataFrame(report.tables["exponents"])
        if len(df):
            fig = Figure(figsize=(5.2, 4))
            ax = fig.subplots()
            sns.lineplot(data=df, x="steps", y="exact", hue="gamma_bar", style="batch_size", markers=True, ax=ax)
            ax.set(xscale="log", yscale="log", title="(1/T)ΣE‖∇f‖² at the tuned step η*")
            save(fig, "exponents.png")

        df = pd.DataFrame(report.tables["critical_batch"])
        if len(df):
            fig = Figure(figsize=(5.2, 4))
            ax = fig.subplots()
            sns.lineplot(data=df, x="batch_size", y="steps", hue="gamma_bar", marker="o", ax=ax)
            ax.set(xscale="log", yscale="log", title="steps to target vs batch size (optimal η per B)")
            save(fig, "critical_batch.png")
    return files
