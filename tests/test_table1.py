"""Table 1 (gmix_curvature.table1): the stability thresholds against the iteration matrix of each optimizer,
the matched-loss reading and Welch's test against hand formulas, and the whole pipeline end to end at the
micro size — files written, numbers reproducible, the paper preset's first steps on a tiny CIFAR directory,
and one-line errors for bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from gmix_curvature.checkpoint import load_checkpoint
from gmix_curvature.cli import main
from gmix_curvature.curvature import ggn_trace
from gmix_curvature.data import load_dataset
from gmix_curvature.errors import GmixError
from gmix_curvature.table1 import (
    PAPER_TABLE1,
    TABLE1_METHODS,
    RunRecord,
    Table1Samples,
    load_table1,
    matched_loss_trace,
    plot_table1,
    plot_trace_vs_loss,
    run_table1,
    stability_threshold,
    summarise,
    table1_data,
    table1_preset,
    welch_p_value,
)
from tests.test_data import write_cifar

# ----------------------------------------------------------------------------- stability threshold


def _iteration_matrix(optimizer: str, lr: float, mu: float, lam: float) -> np.ndarray:
    """The linear map (θ, v) → (θ', v') of one step on ½λθ², written from torch.optim.SGD's update rule."""
    if optimizer == "sgd":  # v' = μv + λθ; θ' = θ − ηv'
        return np.array([[1 - lr * lam, -lr * mu], [lam, mu]])
    # nesterov: v' = μv + λθ; θ' = θ − η(λθ + μv')
    return np.array([[1 - lr * lam * (1 + mu), -lr * mu * mu], [lam, mu]])


THRESHOLD_CASES = [
    pytest.param("sgd", 0.1, 0.9, id="heavy-ball-paper-mu"),
    pytest.param("sgd", 4.096, 0.9, id="heavy-ball-batch-8192"),
    pytest.param("sgd", 0.3, 0.0, id="plain-gd"),
    pytest.param("nesterov", 0.1, 0.9, id="nesterov"),
    pytest.param("nesterov", 7.05, 0.97603, id="nesterov-table3"),
]


@pytest.mark.parametrize("optimizer,lr,mu", THRESHOLD_CASES)
def test_threshold_is_where_the_iteration_turns_unstable(optimizer, lr, mu):
    thr = stability_threshold(optimizer, lr, mu)

    def radius(lam):
        return max(abs(np.linalg.eigvals(_iteration_matrix(optimizer, lr, mu, lam))))

    assert radius(thr * (1 - 1e-6)) < 1 < radius(thr * (1 + 1e-6))
    assert radius(thr) == pytest.approx(1.0, abs=1e-9)


def test_threshold_of_adaptive_optimizers_is_not_given_and_bad_input_raises():
    assert math.isnan(stability_threshold("adam", 0.1, 0.9))
    assert stability_threshold("sgd", 0.0, 0.9) == math.inf
    with pytest.raises(GmixError, match="momentum"):
        stability_threshold("sgd", 0.1, 1.0)


# ----------------------------------------------------------------------------------- statistics


def _welch_by_hand(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


@pytest.mark.parametrize(
    "a,b",
    [([1.0, 2.0, 3.0], [4.0, 5.0, 6.5]), ([0.1, 0.11, 0.13, 0.09], [0.2, 0.5]), ([5.0, 5.1, 4.9], [5.0, 5.2, 4.8])],
    ids=["separated", "unequal-sizes", "same-mean"],
)
def test_welch_p_value_matches_the_formula(a, b):
    assert welch_p_value(a, b) == pytest.approx(_welch_by_hand(a, b), rel=1e-12)


def test_welch_p_value_undefined_cases():
    assert math.isnan(welch_p_value([1.0, 1.0], [1.0, 1.0]))
    assert math.isnan(welch_p_value([1.0, float("nan")], [1.0, 2.0]))


def test_summarise_means_stds_and_p_values():
    runs = [RunRecord("baseline", s, 8, "none", 0.0, 0.0, 1, None, {"x": v}) for s, v in enumerate([1.0, 2.0, 4.0])]
    runs += [RunRecord("gaussian", s, 8, "gaussian", 2.0, 0.25, 1, None, {"x": v}) for s, v in enumerate([3.0, 5.0])]
    base, mix = summarise(runs, {"gaussian": 2.0})
    assert (base.method, mix.method, mix.kappa_ratio) == ("baseline", "gaussian", 2.0)
    assert (base.paper, mix.paper) == (PAPER_TABLE1["baseline"], PAPER_TABLE1["gaussian"])
    assert base.stats["x"]["mean"] == pytest.approx(7 / 3, rel=1e-15)
    assert base.stats["x"]["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1), rel=1e-15)
    assert math.isnan(base.stats["x"]["p_value"])
    assert mix.stats["x"]["p_value"] == pytest.approx(_welch_by_hand([3.0, 5.0], [1.0, 2.0, 4.0]), rel=1e-12)


MATCHED_CASES = [
    # (traces, expected level, expected Tr(G) per run)
    pytest.param({"a": [(1.0, 5.0), (0.1, 7.0)], "b": [(1.0, 2.0), (0.01, 3.0)]}, 0.1, {"a": 7.0, "b": 2.0 * 1.5**0.5},
                 id="interpolate-in-log-log"),
    pytest.param({"a": [(2.0, 1.0), (0.5, 4.0), (0.8, 9.0), (0.4, 2.0)], "b": [(3.0, 1.0), (0.5, 6.0)]}, 0.5,
                 {"a": 4.0, "b": 6.0}, id="first-crossing-of-a-bumpy-trace"),
    pytest.param({"a": [(0.3, 2.0)], "b": [(0.5, 1.0), (0.2, 4.0)]}, 0.3,
                 {"a": 2.0, "b": 4.0 ** (math.log(0.5 / 0.3) / math.log(0.5 / 0.2))}, id="single-record"),
]


@pytest.mark.parametrize("traces,level,expected", MATCHED_CASES)
def test_matched_loss_trace(traces, level, expected):
    recs = {k: [{"loss": loss, "ggn_trace": tr} for loss, tr in v] for k, v in traces.items()}
    got_level, got = matched_loss_trace(recs)
    assert got_level == pytest.approx(level, rel=1e-15)
    assert got == pytest.approx(expected, rel=1e-12)


def test_matched_loss_trace_without_records():
    assert matched_loss_trace({"a": [], "b": [{"loss": float("nan"), "ggn_trace": 1.0}]}) == (None, {})


# ------------------------------------------------------------------------------------- presets


def test_presets_describe_the_paper_and_the_tiny_setting():
    paper, tiny = table1_preset("paper"), table1_preset("tiny")
    assert (paper.batch_size, paper.train["model"], paper.train["data"], paper.train["epochs"]) == (
        8192, "resnet18", "cifar10", 200)
    assert (paper.train["warmup_epochs"], paper.train["lr"], paper.train["base_batch"], paper.train["momentum"]) == (
        20, 0.1, 200, 0.9)
    assert tiny.train["data"] == "digits" and tiny.batch_size / 1437 > 8192 / 50000  # larger share than the paper's
    assert tiny.seeds == 3 and tiny.select_splits == ("fit", "val") and "test" not in tiny.select_splits
    with pytest.raises(ValueError, match="unknown Table 1 preset 'huge'; valid: tiny, paper, micro, mnist1d"):
        table1_preset("huge")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kappa": 0.01, "kappa_ratio": 1.0}, "kappa or kappa_ratio, not both"),
        ({"kappa": -1.0}, "kappa must be > 0"),
        ({"seeds": 0}, "seeds must be an integer >= 1"),
        ({"max_steps": 0, "kappa_ratio": 1.0}, "max_steps must be >= 1"),
        ({"threads": -1}, "threads must be an integer >= 0"),
    ],
    ids=["both-kappas", "negative-kappa", "no-seeds", "zero-steps", "negative-threads"],
)
def test_run_table1_rejects_bad_arguments(kwargs, match):
    with pytest.raises(GmixError, match=match):
        run_table1("micro", **kwargs)


@pytest.mark.parametrize(
    "preset,threads,expected",
    [("tiny", None, 1), ("micro", None, 1), ("tiny", 2, 2), ("tiny", 0, "default"), ("paper", None, "default")],
)
def test_table1_runs_under_the_pinned_thread_count_and_restores_it(monkeypatch, preset, threads, expected):
    import gmix_curvature.table1.runs as table1_runs

    seen = []
    monkeypatch.setattr(table1_runs, "_run_table1", lambda p, *args: seen.append(torch.get_num_threads()) or "result")
    before = torch.get_num_threads()
    assert run_table1(preset, threads=threads) == "result"
    assert seen == [before if expected == "default" else expected] and torch.get_num_threads() == before


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("table1") / "a"
    return run_table1("micro", out=out), out


def test_micro_pipeline_writes_table_json_csv_and_figures(micro):
    result, out = micro
    for name in ("table1.md", "table1.json", "table1.csv", "runs.csv", "paired.csv", "verdict.csv", "table1.png",
                 "trace_vs_loss.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preset = table1_preset("micro")
    # every row and seed trained, kept its checkpoint and recorded curvature along training
    assert [r.method for r in result.rows] == [m.key for m in TABLE1_METHODS]
    assert len(result.runs) == len(TABLE1_METHODS) * preset.seeds
    for r in result.runs:
        assert (out / f"{r.method}-seed{r.seed}" / "checkpoint.pt").exists()
        assert len(r.trace) >= 2 and all("ggn_trace" in t and "loss" in t for t in r.trace)
        assert r.batch_size == (preset.small_batch_size if r.method == "small_batch" else preset.batch_size)
        assert r.metrics["abs_log_ggn_trace"] == pytest.approx(abs(math.log(r.metrics["ggn_trace"])), rel=1e-15)
    # κ was chosen on fit → val, for both noise kinds, among the candidates
    sel = result.selection
    assert sel is not None and sel.splits == ("fit", "val") and set(sel.chosen) == {"gaussian", "rademacher"}
    assert set(sel.chosen.values()) <= set(preset.kappa_sweep)
    assert result.row("gaussian").kappa_ratio == sel.chosen["gaussian"]
    # the JSON and the CSVs hold the same numbers as the result
    saved = json.loads((out / "table1.json").read_text())
    assert saved["paper"] == dict(PAPER_TABLE1)
    assert [r["method"] for r in saved["rows"]] == [r.method for r in result.rows]
    with open(out / "table1.csv") as f:
        summary = {(r["method"], r["metric"]): r for r in csv.DictReader(f)}
    row = summary[("gaussian", "abs_log_ggn_trace")]
    assert float(row["mean"]) == pytest.approx(result.row("gaussian").stats["abs_log_ggn_trace"]["mean"], rel=1e-12)
    assert float(row["paper"]) == PAPER_TABLE1["gaussian"]
    with open(out / "runs.csv") as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == len(result.runs)
    # the printed table is in the paper's layout, with the paper's numbers marked as the paper's
    text = (out / "table1.md").read_text()
    for label in ("SGD Baseline", "SGD + GradientMix (Gaussian)", "SGD + GradientMix (Rademacher)"):
        assert label in text
    assert "5.87 (paper)" in text and "λmax(H)" in text and "Tr(G) @ L*" in text and "κ selection" in text
    assert "Verdict, preset 'micro'" in text and "Paired by seed (2 pairs" in text


def test_micro_pipeline_columns_of_issue_10(micro):
    result, _ = micro
    for r in result.runs:
        m = r.metrics
        cfg = json.loads((result.out / f"{r.method}-seed{r.seed}" / "config.json").read_text())
        assert m["threshold_peak"] == pytest.approx(2 * (1 + cfg["momentum"]) / m["lr_peak"], rel=1e-15)
        assert m["lr_peak"] == pytest.approx(cfg["lr"] * r.batch_size / cfg["base_batch"], rel=1e-15)
        assert m["threshold_final"] >= m["threshold_peak"]
        assert m["lambda_max_ggn"] > 0 and math.isfinite(m["lambda_max_hessian"]) and m["train_loss"] > 0
        assert m["si_sharpness"] > 0 and math.isfinite(m["ggn_trace_matched"])
    assert result.matched_loss is not None and result.matched_loss > 0


def test_measured_samples_are_recorded_and_load_back(micro):
    result, out = micro
    preset = table1_preset("micro")
    measure, eigen = result.samples["measure"], result.samples["eigen"]
    assert (measure.data, measure.split, eigen.split) == ("digits", preset.measure_split, "train")
    assert len(set(measure.indices)) == len(measure.indices) == preset.measure_samples
    assert len(set(eigen.indices)) == len(eigen.indices) == preset.eigen_samples
    # the draw ArrayDataset.subset makes from a generator seeded with 0 (1 for λ_max), as the table always did
    for got, split, n, seed in ((result.measure_data(), "test", preset.measure_samples, 0),
                                (result.eigen_data(), "train", preset.eigen_samples, 1)):
        ref = load_dataset("digits", split).subset(n, torch.Generator().manual_seed(seed))
        assert torch.equal(got.x, ref.x) and torch.equal(got.y, ref.y)
    # the JSON holds them too, and gives the same data back
    saved = json.loads((out / "table1.json").read_text())
    assert saved["samples"]["measure"]["indices"] == list(measure.indices)
    for which in ("measure", "eigen"):
        a, b = table1_data(out / "table1.json", which), table1_data(result, which)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # re-measured in float64 on these samples, a checkpoint gives the table's Tr(G) (measured in float32)
    run = result.runs[0]
    model, _ = load_checkpoint(run.out)
    x, y = result.measure_data().tensors()
    again = ggn_trace(model.double().eval(), (x.double(), y), "exact").value
    assert again == pytest.approx(run.metrics["ggn_trace"], rel=1e-4)


def _same(a, b, rel=1e-12):
    """Equal nested containers, floats to ``rel`` (NaN equals NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel)
    return a == b


def test_a_finished_table_reads_back_with_the_same_statistics(micro, tmp_path):
    result, out = micro
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = load_table1(copy / "table1.json", write=True, plot=False)
    assert _same([r.stats for r in again.rows], [r.stats for r in result.rows])
    assert _same([c.to_dict() for c in again.comparisons], [c.to_dict() for c in result.comparisons])
    assert [v.verdict for v in again.verdicts] == [v.verdict for v in result.verdicts]
    assert again.preset == dataclasses.replace(result.preset, train=dict(result.preset.train))
    assert (copy / "table1.md").read_text() == (out / "table1.md").read_text()
    with pytest.raises(FileNotFoundError, match="expected a table1.json"):
        load_table1(tmp_path / "nowhere")


def test_table1_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        table1_data(tmp_path / "nope.json")
    with pytest.raises(GmixError, match="has no 'samples': it was written before"):
        table1_data({"rows": []})
    saved = {"samples": {"measure": {"data": "digits", "split": "test", "seed": 0, "indices": [0, 1]}}}
    with pytest.raises(GmixError, match="unknown samples 'eigen'; valid: measure"):
        table1_data(saved, "eigen")
    with pytest.raises(GmixError, match="digits/test has 360 samples, but the table measured index 360"):
        Table1Samples("digits", "test", 0, (0, 360)).load()
    assert Table1Samples.draw("digits", "test", 360, None, 0).indices is None
    assert Table1Samples.draw("digits", "test", 360, 400, 0).load().x.shape[0] == 360


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


def test_figures_leave_matplotlib_alone(micro, tmp_path, matplotlib_state_kept):
    """After run_table1 a notebook's own plots must still show: no backend switch, no pyplot state, no rcParams."""
    result, _ = micro
    with matplotlib_state_kept():
        files = [plot_table1(result, tmp_path / "t.png"), plot_trace_vs_loss(result, tmp_path / "v.png")]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_same_seed_gives_the_same_numbers_twice(micro, tmp_path):
    first, _ = micro
    # the same pipeline again, for two of the rows (half the cost): their κ sweep, runs and measurements recur
    two_rows = dataclasses.replace(table1_preset("micro"), methods=("baseline", "rademacher"))
    again = run_table1(two_rows, out=tmp_path / "b", plot=False)
    assert again.kappa_ratios["rademacher"] == first.kappa_ratios["rademacher"]
    assert again.selection.scores == [s for s in first.selection.scores if s["noise"] != "gaussian"]
    before = {(r.method, r.seed): r for r in first.runs}
    assert len(again.runs) == 2 * table1_preset("micro").seeds
    for b in again.runs:
        a = before[(b.method, b.seed)]
        assert _without(a.metrics, "ggn_trace_matched") == _without(b.metrics, "ggn_trace_matched")
        assert [_without(t, "seconds") for t in a.trace] == [_without(t, "seconds") for t in b.trace]


def test_rerun_in_the_same_directory_reuses_the_finished_runs(micro, tmp_path):
    first, out = micro
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stamp = {p: p.stat().st_mtime_ns for p in copy.rglob("checkpoint.pt")}
    again = run_table1("micro", out=copy, seeds=1, plot=False)
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("checkpoint.pt")} == stamp  # nothing retrained
    mine = {(r.method, r.seed): r for r in first.runs}
    assert [r.seed for r in again.runs] == [0] * len(TABLE1_METHODS)
    for r in again.runs:
        assert _without(r.metrics, "ggn_trace_matched") == _without(mine[(r.method, 0)].metrics, "ggn_trace_matched")


def test_rerun_reuses_a_measurement_only_for_the_same_checkpoint_and_settings(micro, tmp_path):
    _, out = micro
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cache = copy / "baseline-seed0" / "table1_measure.json"
    saved = json.loads(cache.read_text())
    assert saved["key"]["hessian_probes"] == table1_preset("micro").hessian_probes
    assert len(saved["key"]["checkpoint_sha256"]) == 64
    saved["metrics"]["test_acc"] = -1.0  # a marker: read back, not measured again
    cache.write_text(json.dumps(saved))
    two_rows = dataclasses.replace(table1_preset("micro"), methods=("baseline",), seeds=1)
    assert run_table1(two_rows, out=copy, plot=False, kappa_ratio=1.0).runs[0].metrics["test_acc"] == -1.0
    # other settings (more Hessian probes): measured again, and the record replaced
    again = run_table1(two_rows, out=copy, plot=False, kappa_ratio=1.0, hessian_probes=2).runs[0].metrics
    assert again["test_acc"] >= 0 and json.loads(cache.read_text())["key"]["hessian_probes"] == 2


def test_paper_preset_first_steps_on_a_tiny_cifar_directory(tmp_path):
    root = write_cifar(tmp_path / "cifar", n_per_file=6)
    paper = table1_preset("paper")
    # the override hook: a narrow ResNet-18, small batches, two rows, λ_max and the trace off (micro covers them)
    small = dataclasses.replace(
        paper, batch_size=8, small_batch_size=4, seeds=1, hessian_probes=1, trace_points=0, eigen_samples=0,
        methods=("baseline", "gaussian"), train={**paper.train, "model_kwargs": {"width": 2}, "micro_batch_size": 4},
    )
    result = run_table1(small, data_dir=str(root), max_steps=2, out=tmp_path / "out", plot=False)
    assert [(r.method, r.steps) for r in result.runs] == [("baseline", 2), ("gaussian", 2)]
    cfg = json.loads((tmp_path / "out" / "baseline-seed0" / "config.json").read_text())
    assert (cfg["model"], cfg["data"], cfg["optimizer"], cfg["schedule"], cfg["lr_scaling"]) == (
        "resnet18", "cifar10", "sgd", "poly", "linear")
    assert result.kappa_ratios["gaussian"] == paper.kappa_ratio and result.runs[1].kappa == paper.kappa_ratio / 8
    assert math.isnan(result.runs[0].metrics["lambda_max_ggn"])
    assert all(math.isfinite(r.metrics["ggn_trace"]) for r in result.runs)


# ------------------------------------------------------------------------------------------- CLI


def _cli_error(capsys, argv):
    code = main(["table1", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_unknown_preset(capsys):
    err = _cli_error(capsys, ["--preset", "huge"])
    assert "unknown Table 1 preset 'huge'; valid: tiny, paper, micro, mnist1d" in err


def test_cli_paper_preset_needs_a_data_directory(capsys, tmp_path):
    assert "needs --data-dir" in _cli_error(capsys, ["--preset", "paper"])
    assert "does not exist" in _cli_error(capsys, ["--preset", "paper", "--data-dir", str(tmp_path / "nowhere")])
    assert "expected the folder" in _cli_error(capsys, ["--preset", "paper", "--data-dir", str(tmp_path)])


def test_cli_paper_preset_with_a_malformed_data_directory(capsys, tmp_path):
    root = write_cifar(tmp_path / "cifar", n_per_file=2)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    assert "is not a CIFAR pickle file" in _cli_error(capsys, ["--preset", "paper", "--data-dir", str(root)])
    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 10), dtype=np.uint8), "labels": [0, 1]}, f)
    assert "must be N×3072" in _cli_error(capsys, ["--preset", "paper", "--data-dir", str(root)])


def test_cli_rejects_both_kappas_and_lists_presets(capsys):
    code = main(["table1", "--list-presets"])
    assert code == 0 and "paper" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["table1", "--kappa", "0.1", "--kappa-ratio", "1"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
