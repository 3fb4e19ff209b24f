"""The simulation suite of ``gmix theory``: its verdicts (micro preset, through the CLI), its simulators
against the exact recursion, and its command-line errors."""

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import curve_fit

from gmix_curvature.cli import main
from gmix_curvature.noise import expected_gamma, kappa_from_ratio, sample_weights
from gmix_curvature.theory import (
    NoisyQuadratic,
    critical_batch_fit,
    critical_batch_steps,
    expected_mixed_gradient_norm,
    expected_weight_sum_sq,
    mixed_gradient_norm_variance,
)
from gmix_curvature.theory_checks import (
    PRESETS,
    RESOLVE_SE,
    Z_SCORE,
    TheoryReport,
    Verdict,
    _ModelStats,
    check_critical_batch,
    check_trace_link,
    nesterov_aux_sequence,
    plot_report,
    rademacher_enumeration,
    run_theory_checks,
    sample_weight_matrix,
    simulate_nesterov,
    train_digits_cnn,
)

# ------------------------------------------------------------------ the suite, once, through the CLI


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    code = main(["theory", "--preset", "micro", "--quiet", "--json", str(out / "r.json"), "--out", str(out / "run")])
    report = json.loads((out / "r.json").read_text())
    return code, report, out


def _rows(report, prefix):
    rows = [c for c in report["checks"] if c["name"].startswith(prefix)]
    assert rows, f"no check named {prefix}*"
    return rows


def test_micro_suite_exits_zero_with_every_verdict_as_expected(micro):
    code, report, _ = micro
    bad = [(c["name"], c["verdict"], c["expect"]) for c in report["checks"] if not c["ok"]]
    assert bad == []
    assert code == 0 and report["ok"] is True
    assert {c["item"] for c in report["checks"]} == {1, 2, 3, 4, 5}


# (check name prefix, verdict every such row must have)
EXPECTED_VERDICTS = [
    ("second_moment/", "agrees"),  # corrected Eq. 18 on the CNN and by enumeration
    ("eq18/", "disagrees"),  # Eq. 18 as printed
    ("eq30/", "disagrees"),  # Appendix B.1, Eq. 27-30
    ("noise_trace/", "agrees"),
    ("gamma_bar/", "agrees"),
    ("gamma_var/", "agrees"),
    ("trace_link/", "agrees"),
    ("hutchinson_only/", "disagrees"),
    ("eq11_is_ggn", "disagrees"),  # Tr(AᵀA)/n is the empirical Fisher, not Tr(G)
    ("empirical_fisher/crosscheck", "agrees"),
    ("lemma1/corrected", "agrees"),
    ("lemma1/printed", "disagrees"),  # −η/(1−η) should read −η/(1−μ)
    ("lemma2", "holds"),
    ("lemma2/identity", "agrees"),
    ("algebra/", None),  # agrees or holds: checked below
    ("stepsize/equality", "violated"),
    ("stepsize/counterexample", "violated"),
    ("grid/recursion_vs_mc", "agrees"),
    ("grid/corrected_bound", "holds"),
    ("grid/printed_bound", "violated"),
    ("exponent/", "agrees"),
    ("critical_batch/equivalence/", "agrees"),
    ("critical_batch/b_noise/", "agrees"),
    ("noise_scale", "agrees"),
]


@pytest.mark.parametrize("prefix,verdict", EXPECTED_VERDICTS, ids=[p for p, _ in EXPECTED_VERDICTS])
def test_micro_suite_verdicts(micro, prefix, verdict):
    for row in _rows(micro[1], prefix):
        if verdict is None:
            assert row["verdict"] in ("agrees", "holds"), row
        elif prefix == "lemma2" and row["name"] != "lemma2":
            continue
        else:
            assert row["verdict"] == verdict, row


def test_micro_suite_measurements_are_sane(micro):
    report = micro[1]
    for row in _rows(report, "second_moment/cnn"):
        assert row["ci"] is not None and 0 < row["ci"] < 0.1 * row["measured"]
    (printed,) = _rows(report, "stepsize/counterexample")
    assert float(printed["measured"]) > 1e6 * float(printed["expected"])  # diverges inside the printed step range
    assert printed["detail"]["corrected_limit"] < 0.5 * printed["detail"]["printed_limit"]
    for row in _rows(report, "exponent/"):
        assert abs(row["measured"] - row["expected"]) <= row["ci"]
    model = report["tables"]["models"][0]
    assert 0 < model["loss"] < 2.3 and model["grad_norm_sq"] > 0.01 * model["sigma_sq"]  # partly trained


def test_micro_suite_writes_plots_and_config(micro):
    out = micro[2] / "run"
    for name in ("report.json", "config.json", "second_moment.png", "theorem1_grid.png", "exponents.png",
                 "critical_batch.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "config.json").read_text())["preset"]["name"] == "micro"


def test_micro_hutchinson_slip_is_resolvable_and_refuted(micro):
    (row,) = _rows(micro[1], "hutchinson_only/")
    assert row["detail"]["resolvable"] and row["detail"]["gap_in_se"] >= RESOLVE_SE
    assert row["detail"]["gap"] == pytest.approx(micro[1]["tables"]["models"][0]["grad_norm_sq"], rel=1e-9)


def test_plot_report_leaves_matplotlib_alone(micro, tmp_path, matplotlib_state_kept):
    report = micro[1]
    rebuilt = TheoryReport(report["preset"], report["seed"], [], report["tables"], {})
    with matplotlib_state_kept():
        files = plot_report(rebuilt, tmp_path)
    assert [f.name for f in files] == ["second_moment.png", "theorem1_grid.png", "exponents.png", "critical_batch.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_check_names_are_unique(micro):
    names = [c["name"] for c in micro[1]["checks"]]
    assert len(names) == len(set(names)), "check names must be unique"


# ------------------------------------------------------------------ simulators against exact forms


GRID = [  # (kind, B, κ, η, μ)
    ("gaussian", 4, 0.5, 0.3, 0.5),
    ("rademacher", 1, 0.8, 0.2, 0.0),
    ("dirichlet", 8, 0.1, 0.05, 0.9),
    ("none", 2, 0.0, 0.5, 0.3),
]


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind,B,kappa,eta,mu", GRID, ids=[c[0] for c in GRID])
def test_simulated_nesterov_matches_the_exact_recursion(kind, B, kappa, eta, mu):
    q = NoisyQuadratic.standard(dim=5, condition=4.0)
    T, seeds = 40, 2_000
    sim = simulate_nesterov(q, eta=eta, mu=mu, steps=T, kind=kind, batch_size=B, kappa=kappa, seeds=seeds,
                            generator=torch.Generator().manual_seed(8))["avg_grad_norm_sq"]
    exact = float(q.expected_trajectory(eta=eta, mu=mu, steps=T, kind=kind, batch_size=B,
                                        kappa=kappa)["grad_norm_sq"].mean())
    assert abs(float(sim.mean()) - exact) <= Z_SCORE * float(sim.std()) / math.sqrt(seeds)


def test_lemma1_holds_for_any_gradient_sequence():
    """y_{t+1} − y_t = −η/(1−μ)·g_{t+½} is algebra: check it on arbitrary g's run through Eq. 13."""
    gen = torch.Generator().manual_seed(9)
    eta, mu, T = 0.3, 0.7, 25
    g = torch.randn(T, 3, generator=gen, dtype=torch.float64)
    theta, v = torch.randn(3, generator=gen, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    xs = []
    for t in range(T):
        xs.append(theta + mu * v)
        v = mu * v - eta * g[t]
        theta = theta + v
    y = nesterov_aux_sequence(torch.stack(xs), g, eta, mu)
    torch.testing.assert_close(y[1:] - y[:-1], -eta / (1 - mu) * g[:-1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y[1:] - y[:-1], -eta / (1 - eta) * g[:-1])


@pytest.mark.montecarlo
@pytest.mark.parametrize("kind,B,kappa", [("gaussian", 5, 0.3), ("rademacher", 4, 0.2), ("dirichlet", 6, 0.1)])
def test_vectorised_sampler_matches_sample_weights(kind, B, kappa):
    """Same distribution as noise.sample_weights: γ and (Σπ)² agree in mean within Z standard errors."""
    n = 5_000
    gen = torch.Generator().manual_seed(10)
    a = sample_weight_matrix(kind, B, kappa, n, gen)
    b = torch.stack([sample_weights(kind, B, kappa, gen, dtype=torch.float64) for _ in range(n)])
    for stat in (lambda w: B * w.square().sum(1), lambda w: w.sum(1).square(), lambda w: w[:, 0]):
        sa, sb = stat(a), stat(b)
        se = math.sqrt(float(sa.var()) / n + float(sb.var()) / n)
        assert abs(float(sa.mean()) - float(sb.mean())) <= Z_SCORE * se + 1e-12
    assert float((B * a.square().sum(1)).mean()) == pytest.approx(expected_gamma(kind, B, kappa), rel=0.05)
    assert float(a.sum(1).square().mean()) == pytest.approx(expected_weight_sum_sq(kind, B, kappa), rel=0.05)


def test_rademacher_enumeration_reports_the_missing_term():
    r = rademacher_enumeration(n=2, batch_size=3, kappa=0.4, dim=2, generator=torch.Generator().manual_seed(11))
    assert r["enumerated"] == pytest.approx(r["closed_form"], rel=1e-12)
    assert r["closed_form"] - r["eq18"] == pytest.approx(3 * 0.4**2 * r["grad_norm_sq"], rel=1e-12)


def test_train_digits_cnn_is_reproducible_and_never_reseeds_the_global_rng():
    before = torch.initial_seed()
    m1, (x, y) = train_digits_cnn(3, width=4, num_samples=64, seed=5)
    m2, _ = train_digits_cnn(3, width=4, num_samples=64, seed=5)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert x.dtype == torch.float64 and x.shape == (64, 1, 8, 8) and not m1.training
    assert torch.initial_seed() == before  # manual_seed would change it


# ------------------------------------------------------------------ resolvability and fit uncertainty


def _gram(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    return a @ a.T


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_mixed_gradient_norm_variance_is_exact(kind):
    """Var of z̃ᵀKz̃ against an exact reference: Rademacher by enumerating all signs, Gaussian by tensor
    Gauss–Hermite quadrature (3 nodes per axis integrate the degree-4 polynomial (z̃ᵀKz̃)² exactly)."""
    n, kappa = 3, 0.7
    k = _gram(n, 12).numpy()
    if kind == "rademacher":
        nodes, weights = np.array([-1.0, 1.0]), np.array([0.5, 0.5])
    else:
        nodes, weights = np.polynomial.hermite_e.hermegauss(3)
        weights = weights / weights.sum()
    m1 = m2 = 0.0
    for idx in itertools.product(range(len(nodes)), repeat=n):
        z = 1.0 / n + kappa * nodes[list(idx)]
        w = float(np.prod(weights[list(idx)]))
        q = float(z @ k @ z)
        m1, m2 = m1 + w * q, m2 + w * q * q
    mean_sq = float(np.full(n, 1.0 / n) @ k @ np.full(n, 1.0 / n))
    assert m1 == pytest.approx(expected_mixed_gradient_norm(kind, n, kappa, mean_sq, float(np.trace(k))), rel=1e-12)
    assert m2 - m1**2 == pytest.approx(mixed_gradient_norm_variance(kind, torch.from_numpy(k), kappa), rel=1e-10)


def test_mixed_gradient_norm_variance_bad_input():
    assert mixed_gradient_norm_variance("none", torch.eye(3), 0.0) == 0.0
    with pytest.raises(ValueError, match="not dirichlet"):
        mixed_gradient_norm_variance("dirichlet", torch.eye(3), 0.1)
    with pytest.raises(ValueError, match="square n x n matrix"):
        mixed_gradient_norm_variance("gaussian", torch.ones(2, 3), 0.1)


def test_critical_batch_fit_standard_errors_are_those_of_the_nonlinear_fit():
    """The delta-method SEs of the linear weighted fit equal curve_fit's on S = S_min(1 + B_noise/B) (relative
    errors)."""
    b = 2.0 ** np.arange(12)
    noise = np.random.default_rng(13).normal(0.0, 0.03, b.size)
    s = critical_batch_steps(b, 40.0, 300.0) * (1 + noise)
    fit = critical_batch_fit(b, s)
    popt, pcov = curve_fit(lambda x, s_min, b_noise: s_min * (1 + b_noise / x), b, s, p0=(30.0, 200.0), sigma=s,
                           absolute_sigma=False, xtol=1e-14, ftol=1e-14)
    assert (fit.s_min, fit.b_noise) == (pytest.approx(popt[0], rel=1e-7), pytest.approx(popt[1], rel=1e-7))
    assert (fit.s_min_se, fit.b_noise_se) == (pytest.approx(math.sqrt(pcov[0, 0]), rel=1e-6),
                                              pytest.approx(math.sqrt(pcov[1, 1]), rel=1e-6))
    assert math.isnan(critical_batch_fit([1, 2], [3.0, 2.0]).b_noise_se)  # no degree of freedom left


def _stats(offset: float, n: int = 200) -> _ModelStats:  # n > 1 + r² so that simplex weights reach κ = r/n
    gen = torch.Generator().manual_seed(14)
    a = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    a = a - a.mean(0) + offset * torch.ones(6, dtype=torch.float64)  # ∇f = offset·1, ‖∇f‖² = 6·offset²
    mean = a.mean(0)
    return _ModelStats("synthetic", a, a @ a.T, mean, float(mean @ mean), float((a - mean).square().sum(1).mean()),
                       0.0, 0.0)


@pytest.mark.parametrize("offset,resolvable", [(1.0, True), (1e-3, False)], ids=["large-gradient", "near-optimum"])
def test_hutchinson_slip_expectation_follows_the_closed_forms(offset, resolvable):
    p = dataclasses.replace(PRESETS["micro"], ggn=False, trace_draws=2_000)
    st = _stats(offset)
    rows, info = check_trace_link(p, None, None, st, torch.Generator().manual_seed(15))
    (row,) = [r for r in rows if r.name.startswith("hutchinson_only/")]
    kappa = kappa_from_ratio(p.trace_ratio, st.A.shape[0])
    se = math.sqrt(mixed_gradient_norm_variance("gaussian", st.K, kappa) / p.trace_draws)
    assert row.detail["gap"] == pytest.approx(st.grad_norm_sq, rel=1e-9) and row.detail["se"] == se
    assert row.detail["resolvable"] is resolvable and row.ok
    if resolvable:
        assert row.verdict == row.expect == Verdict.DISAGREES and st.grad_norm_sq > RESOLVE_SE * se
    else:
        assert row.verdict == row.expect == Verdict.INFO and "not resolvable" in row.statement
        assert row.detail["verdict_if_checked"] == "agrees"
    assert all(r.ok for r in rows)


def test_full_preset_critical_batch_checks_on_matched_windows():
    """The full preset's item 5 (cheap: closed forms): B_noise ∝ γ̄ within the fits' SEs on matched windows, and
    the whole-grid ratio reported as info with its bias."""
    rows, _ = check_critical_batch(PRESETS["full"], NoisyQuadratic.standard())
    assert all(r.ok for r in rows), [(r.name, r.verdict, r.expect) for r in rows if not r.ok]
    ratios = [r for r in rows if r.name.startswith("critical_batch/b_noise/")]
    whole = [r for r in rows if r.name.startswith("critical_batch/b_noise_whole_grid/")]
    assert len(ratios) == len(whole) == len(PRESETS["full"].cbs_gammas) - 1
    for r in ratios:
        assert r.verdict == Verdict.AGREES and 0 < r.ci < 0.5 * r.expected
        assert r.detail["window"][0] == r.expected * 1  # the matched window starts at γ̄·1
    for r in whole:
        assert r.verdict == Verdict.INFO and r.detail["verdict_if_checked"] in ("agrees", "disagrees")
        assert r.detail["bias_vs_matched"] == pytest.approx(r.measured / r.detail["ratio_matched"] - 1, rel=1e-12)


def test_critical_batch_needs_gamma_one_and_a_window():
    with pytest.raises(ValueError, match="needs gamma 1 among cbs_gammas"):
        check_critical_batch(dataclasses.replace(PRESETS["micro"], cbs_gammas=(2, 4)), NoisyQuadratic.standard())
    with pytest.raises(ValueError, match=">= 3 batch sizes"):
        check_critical_batch(dataclasses.replace(PRESETS["micro"], cbs_batches=(1, 2, 4, 8)), NoisyQuadratic.standard())


# ------------------------------------------------------------------ presets and errors


def test_presets_registry():
    assert set(PRESETS) == {"micro", "fast", "full"}
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid: micro, fast, full"):
        run_theory_checks("huge")


def test_cli_unknown_preset_is_one_line_exit_2(capsys):
    assert main(["theory", "--preset", "huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset 'huge'" in err[0]


def test_cli_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert main(["theory", "--checkpoint", str(tmp_path / "nope.pt"), "--num-samples", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_cli_noise_scale_of_a_state_dict(tmp_path, capsys):
    from gmix_curvature.models import build_model

    path = tmp_path / "w.pt"
    torch.save(build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8)).state_dict(), path)
    code = main(["theory", "--checkpoint", str(path), "--model", "digits_cnn", "--num-samples", "32",
                 "--kind", "rademacher", "--ratio", "1", "--json", str(tmp_path / "ns.json")])
    out = capsys.readouterr().out
    assert code == 0
    res = json.loads((tmp_path / "ns.json").read_text())
    assert res["b_simple_mixed"] == pytest.approx(2 * res["b_simple"] + 1, rel=1e-12)
    assert res["b_simple"] == pytest.approx(res["trace_sigma"] / res["grad_norm_sq"], rel=1e-12)
    assert "B_simple" in out and res["num_samples"] == 32 and res["kind"] == "rademacher"
