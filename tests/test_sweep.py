"""gmix sweep: grid cells, resuming where it stopped, one CSV, the figure, and the command line."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from gmix_curvature.cli import main
from gmix_curvature.errors import GmixError, TrainingDiverged
from gmix_curvature.sweep import (
    cell_lock,
    gather_sweep,
    grid_cells,
    parse_shard,
    plot_sweep,
    run_sweep,
    shard_cells,
    shard_from_env,
)
from gmix_curvature.train import TrainConfig, train

BASE = {"model": "mlp", "model_kwargs": {"hidden": [8]}, "data": "digits", "steps": 2, "eval_every": 2,
        "noise": "gaussian", "kappa_ratio": 1.0, "lr": 0.05}  # fmt: skip
GRID = {"batch_size": [32, 64], "noise": ["none", "gaussian"], "seed": [0, 1]}


class Killed(Exception):
    """Stands for the sweep being killed mid-cell."""


def kill_at(step_to_kill: int):
    def callback(step, final):
        if step == step_to_kill:
            raise Killed

    return callback


class FakeTrain:
    """Records the configurations it is called with; accuracy a function of the cell, so rows are checkable."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[TrainConfig, bool]] = []
        self.fail_on = fail_on

    def __call__(self, config, *, resume, datasets):
        if self.fail_on and config.out.endswith(self.fail_on):
            raise Killed
        self.calls.append((config, resume))
        acc = config.batch_size / 100 + (0.01 if config.noise != "none" else 0) + config.seed / 1000
        return SimpleNamespace(steps=config.steps, final={"test_acc": acc, "test_loss": float("nan")})


def test_grid_cells_product_and_coupled_values():
    coupled = [{"batch_size": 64, "warmup_steps": 4000}, {"batch_size": 128, "warmup_steps": 2000}]
    cells = grid_cells({"batch_size": coupled, "optimizer": ["adam", "lamb"]})
    assert [c.name for c in cells] == [
        "batch_size=64_optimizer=adam", "batch_size=64_optimizer=lamb",
        "batch_size=128_optimizer=adam", "batch_size=128_optimizer=lamb",
    ]  # fmt: skip
    assert cells[3].overrides == {"batch_size": 128, "warmup_steps": 2000, "optimizer": "lamb"}
    assert cells[3].labels == {"batch_size": 128, "optimizer": "lamb"}
    assert grid_cells({})[0].overrides == {}
    with pytest.raises(GmixError, match="grid axis 'seed' needs a non-empty list"):
        grid_cells({"seed": []})


def test_sweep_runs_every_cell_and_collects_one_csv(tmp_path):
    fake = FakeTrain()
    res = run_sweep(BASE, grid=GRID, out=tmp_path, train_fn=fake, plot=True)
    assert len(fake.calls) == 8 and not any(resume for _, resume in fake.calls)
    configs = {c.out: c for c, _ in fake.calls}
    c = configs[str(tmp_path / "batch_size=64_noise=none_seed=1")]
    assert (c.batch_size, c.noise, c.seed, c.model, c.lr) == (64, "none", 1, "mlp", 0.05)
    df = pd.read_csv(res.csv)
    assert len(df) == 8 and set(df.columns) >= {"cell", "batch_size", "noise", "seed", "steps", "test_acc"}
    row = df[(df.batch_size == 64) & (df.noise == "gaussian") & (df.seed == 1)].iloc[0]
    assert row.test_acc == pytest.approx(0.64 + 0.01 + 0.001)
    assert res.figure is not None and res.figure.stat().st_size > 1000


def test_sweep_resumes_where_it_stopped(tmp_path):
    with pytest.raises(Killed):
        run_sweep(BASE, grid=GRID, out=tmp_path, train_fn=FakeTrain(fail_on="batch_size=64_noise=none_seed=0"))
    (tmp_path / "batch_size=64_noise=none_seed=0").mkdir(exist_ok=True)  # the sweep made it (its lock is there)
    (tmp_path / "batch_size=64_noise=none_seed=0" / "checkpoint.pt").write_bytes(b"")  # it had checkpointed
    again = FakeTrain()
    res = run_sweep(BASE, grid=GRID, out=tmp_path, train_fn=again, plot=False)
    assert len(res.skipped) == 4 and res.resumed == ["batch_size=64_noise=none_seed=0"] and len(res.ran) == 3
    assert [r for c, r in again.calls if c.out.endswith("batch_size=64_noise=none_seed=0")] == [True]
    assert len(pd.read_csv(res.csv)) == 8


def test_sweep_validates_every_cell_before_running(tmp_path):
    fake = FakeTrain()
    with pytest.raises(GmixError, match="unknown configuration keys: optimiser"):
        run_sweep(BASE, grid={"optimiser": ["sgd"]}, out=tmp_path, train_fn=fake)
    assert fake.calls == []


def test_real_sweep_resumes_an_interrupted_cell_exactly(tmp_path):
    """With the real engine: cut a cell after its first checkpoint, sweep again — same result as straight."""
    base = {**BASE, "steps": 4, "eval_every": 2, "checkpoint_every": 2}
    grid = {"batch_size": [64]}
    straight = run_sweep(base, grid=grid, out=tmp_path / "a", plot=False)
    cell = tmp_path / "b" / "batch_size=64"
    with pytest.raises(Killed):
        # killed at the evaluation of step 4, before its checkpoint: the checkpoint of step 2 remains
        config = TrainConfig.from_dict({**base, "batch_size": 64, "out": str(cell), "progress": False})
        train(config, callback=kill_at(4))
    assert (cell / "checkpoint.pt").exists() and not (cell / "result.json").exists()
    resumed = run_sweep(base, grid=grid, out=tmp_path / "b", plot=False)
    assert resumed.resumed == ["batch_size=64"]
    assert resumed.rows[0]["test_acc"] == straight.rows[0]["test_acc"]
    assert resumed.rows[0]["test_loss"] == straight.rows[0]["test_loss"]


def test_cli_sweep(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["sweep", "digits", "--out", str(out), "--set", "steps=2", "--set", 'model_kwargs={"width": 4}',
            "--axis", "batch_size=32,64", "--no-plot"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0
    assert "new          batch_size=32" in capsys.readouterr().out
    assert main(args) == 0
    assert "2 cells" in capsys.readouterr().out and len(pd.read_csv(out / "results.csv")) == 2
    assert main(args) == 0
    assert "skipped 2 finished" in capsys.readouterr().out
    assert main(["sweep", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmix sweep: error: unknown preset 'nope'; valid:") and "\n" not in err
    assert main(["sweep", "digits", "--out", str(out), "--set", "batchsize=3"]) == 2
    assert "unknown configuration keys: batchsize" in capsys.readouterr().err


def test_plot_sweep_leaves_matplotlib_alone(tmp_path, matplotlib_state_kept):
    rows = [{"cell": f"c{i}", "optimizer": opt, "noise": noise, "batch_size": b, "seed": seed,
             "test_acc": 0.5 + b / 1000 + seed / 100}
            for i, (opt, noise, b, seed) in enumerate(
                (o, n, b, s) for o in ("sgd", "lars") for n in ("none", "gaussian") for b in (32, 64) for s in (0, 1))]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    with matplotlib_state_kept():
        path = plot_sweep(tmp_path / "results.csv", tmp_path / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(GmixError, match="has no column 'val_acc'"):
        plot_sweep(tmp_path / "results.csv", tmp_path / "f.png", metric="val_acc")


# ------------------------------------------------------------------------------------------------ scaling out


def test_shards_and_jobs_give_the_serial_sweeps_cells_bit_for_bit(tmp_path):
    """The real engine, one thread per cell: serial, --jobs 2 (spawned workers) and two shards one after the
    other give the same cells with identical rows (metrics compared exactly, as stored)."""
    grid = {"batch_size": [32], "noise": ["none", "gaussian"], "seed": [0, 1]}
    serial = run_sweep(BASE, grid=grid, out=tmp_path / "serial", plot=False, threads=1)
    jobs = run_sweep(BASE, grid=grid, out=tmp_path / "jobs", plot=False, threads=1, jobs=2)
    first = run_sweep(BASE, grid=grid, out=tmp_path / "shards", plot=False, threads=1, shard=(0, 2))
    assert first.ran == ["batch_size=32_noise=none_seed=0", "batch_size=32_noise=gaussian_seed=0"]
    assert len(first.missing) == 2 and len(pd.read_csv(first.csv)) == 2  # gathered at the end of the shard
    second = run_sweep(BASE, grid=grid, out=tmp_path / "shards", plot=False, threads=1, shard=(1, 2))
    assert second.ran == ["batch_size=32_noise=none_seed=1", "batch_size=32_noise=gaussian_seed=1"]
    assert not second.missing and len(serial.ran) == len(jobs.ran) == 4 and sorted(jobs.ran) == sorted(serial.ran)
    want = pd.read_csv(serial.csv)
    assert want["test_acc"].notna().all() and (want["threads"] == 1).all()
    for other in (jobs, second):
        pd.testing.assert_frame_equal(pd.read_csv(other.csv), want, check_exact=True)
        assert other.rows == serial.rows


def test_cell_lock_excludes_a_second_holder_and_is_released():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with cell_lock(Path(d) / "c") as first:
            with cell_lock(Path(d) / "c") as second:  # flock: another open file, even in this process
                assert (first, second) == (True, False)
            assert f"{os.getpid()}" in (Path(d) / "c" / ".lock").read_text()
        with cell_lock(Path(d) / "c") as again:
            assert again


def _hold_lock(cell_dir: str, ready, release) -> None:
    with cell_lock(cell_dir):
        ready.set()
        release.wait(60)
        os._exit(1)  # killed while holding it: the kernel drops the lock


def test_a_cell_locked_by_a_live_process_is_skipped_and_freed_when_it_dies(tmp_path):
    grid = {"batch_size": [32, 64]}
    held = tmp_path / "batch_size=64"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(held), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        status = {r["cell"]: r["status"] for r in run_sweep(BASE, grid=grid, out=tmp_path, dry_run=True).rows}
        assert status == {"batch_size=32": "new", "batch_size=64": "running"}
        fake = FakeTrain()
        res = run_sweep(BASE, grid=grid, out=tmp_path, train_fn=fake, plot=False)
        assert (res.ran, res.busy, res.missing) == (["batch_size=32"], ["batch_size=64"], ["batch_size=64"])
        assert [c.out for c, _ in fake.calls] == [str(tmp_path / "batch_size=32")]
        assert "1 running elsewhere" in res.summary()
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 1
    res = run_sweep(BASE, grid=grid, out=tmp_path, train_fn=FakeTrain(), plot=False)
    assert (res.ran, res.skipped, res.busy) == (["batch_size=64"], ["batch_size=32"], [])


def logging_train(config, *, resume, datasets):
    """A picklable stand-in for train: appends its cell to OUT/calls.log (one write, O_APPEND) and takes a while."""
    with open(Path(config.out).parent / "calls.log", "a") as f:
        f.write(Path(config.out).name + "\n")
    time.sleep(0.1)
    return SimpleNamespace(steps=config.steps, final={"test_acc": config.batch_size / 100 + config.seed / 1000})


def _whole_sweep(out: str) -> list[str]:
    return run_sweep(BASE, grid=GRID, out=out, train_fn=logging_train, plot=False).ran


def test_concurrent_sweeps_over_one_grid_run_each_cell_once(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        ran = pool.map(_whole_sweep, [str(tmp_path)] * 2)
    calls = (tmp_path / "calls.log").read_text().split()
    cells = [c.name for c in grid_cells(GRID)]
    assert sorted(calls) == sorted(cells)  # each of the 8 cells trained exactly once
    assert sorted(ran[0] + ran[1]) == sorted(cells)
    assert len(pd.read_csv(tmp_path / "results.csv")) == 8  # the last sweep to gather saw every cell


def test_gather_rebuilds_results_csv_from_disk(tmp_path, capsys):
    res = run_sweep(BASE, grid=GRID, out=tmp_path, train_fn=FakeTrain(), plot=False, shard=(1, 3))
    assert len(res.rows) == 3 and len(res.missing) == 5
    run_sweep(BASE, grid=GRID, out=tmp_path, train_fn=FakeTrain(), plot=False)
    want = (tmp_path / "results.csv").read_text()
    (tmp_path / "results.csv").unlink()
    again = gather_sweep(tmp_path, plot=False)
    assert (tmp_path / "results.csv").read_text() == want and not again.missing
    assert [r["cell"] for r in again.rows] == [c.name for c in grid_cells(GRID)]  # the grid's order
    (tmp_path / "results.csv").unlink()
    assert main(["sweep", "--gather", str(tmp_path), "--no-plot"]) == 0
    assert "8 cells in" in capsys.readouterr().out and (tmp_path / "results.csv").read_text() == want
    with pytest.raises(GmixError, match="holds no sweep"):
        gather_sweep(tmp_path / "batch_size=32_noise=none_seed=0")


def test_a_diverged_cell_is_a_finished_row(tmp_path):
    def diverging(config, *, resume, datasets):
        if config.noise == "gaussian" and config.batch_size == 64:
            raise TrainingDiverged("non-finite loss (nan) at step 2;\n no checkpoint yet")
        return FakeTrain()(config, resume=resume, datasets=datasets)

    grid = {"batch_size": [32, 64], "noise": ["none", "gaussian"]}
    res = run_sweep(BASE, grid=grid, out=tmp_path, train_fn=diverging, plot=False)
    row = next(r for r in res.rows if r["cell"] == "batch_size=64_noise=gaussian")
    assert row["diverged"] == "non-finite loss (nan) at step 2; no checkpoint yet" and row["steps"] is None
    assert run_sweep(BASE, grid=grid, out=tmp_path, train_fn=diverging, plot=False).skipped == [
        c.name for c in grid_cells(grid)]  # fmt: skip


SLURM = [  # (environment, shard)
    pytest.param({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, (0, 2), id="array=0-1"),
    pytest.param({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2"}, (1, 2),
                 id="array=3-4"),
    pytest.param({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
                  "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3), id="array=0-4:2"),
    pytest.param({"SLURM_JOB_ID": "7"}, None, id="not-an-array"),
]  # fmt: skip


@pytest.mark.parametrize(("env", "shard"), SLURM)
def test_shard_from_slurm_array(env, shard):
    assert shard_from_env(env) == shard


def test_shard_from_slurm_listed_ids_asks_for_shard():
    with pytest.raises(GmixError, match="give --shard I/N"):  # --array=1,5,7: task 7 is index 6 of 3
        shard_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"})


def test_shards_partition_the_grid():
    cells = list(range(10))
    parts = [shard_cells(cells, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == cells and parts[0] == [0, 3, 6, 9]
    assert parse_shard(" 2 / 3 ") == (2, 3)


def test_cli_shard_defaults_from_slurm(tmp_path, capsys, monkeypatch):
    args = ["sweep", "digits", "--out", str(tmp_path), "--axis", "batch_size=16,32,64,128", "--dry-run"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(args) == 0
    listed = capsys.readouterr().out
    assert "batch_size=32\n" in listed and "batch_size=128\n" in listed and "batch_size=16\n" not in listed
    assert main([*args, "--shard", "0/4"]) == 0  # --shard wins over the environment
    assert capsys.readouterr().out.split()[:2] == ["new", "batch_size=16"]


BAD = [  # (arguments after `gmix sweep`, the error's words)
    pytest.param(["digits", "--out", "X", "--shard", "3/2"], "shard 3/2: the index must be 0..1", id="shard-index"),
    pytest.param(["digits", "--out", "X", "--shard", "1/0"], "the number of shards must be >= 1", id="shard-zero"),
    pytest.param(["digits", "--out", "X", "--shard", "half"], "expected I/N", id="shard-text"),
    pytest.param(["digits", "--out", "X", "--jobs", "0"], "jobs must be an integer >= 1, got 0", id="jobs-zero"),
    pytest.param(["digits", "--out", "X", "--jobs", "two"], "jobs must be an integer >= 1", id="jobs-text"),
    pytest.param(["digits", "--out", "X", "--threads", "0"], "threads must be an integer >= 1", id="threads"),
    pytest.param(["digits"], "--out DIR is required", id="no-out"),
    pytest.param([], "give a preset", id="no-preset"),
    pytest.param(["--gather", "NOPE"], "is not a directory", id="gather-missing"),
    pytest.param(["digits", "--gather", "X"], "takes no preset", id="gather-and-preset"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "words"), BAD)
def test_cli_sweep_bad_input_is_one_line(args, words, tmp_path, capsys):
    args = [str(tmp_path / a) if a in ("X", "NOPE") else a for a in args]
    assert main(["sweep", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmix sweep: error: ") and words in err and "\n" not in err
    assert not (tmp_path / "X").exists()


def test_grid_union_rejects_one_cell_with_two_settings():
    with pytest.raises(GmixError, match="appears twice with different settings"):
        grid_cells([{"lr": [{"lr": 0.1, "momentum": 0.9}]}, {"lr": [{"lr": 0.1, "momentum": 0.5}]}])


def test_manifest_records_the_grid(tmp_path):
    run_sweep(BASE, grid=GRID, out=tmp_path, train_fn=FakeTrain(), plot=False, shard=(0, 4))
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert manifest["cells"] == [c.name for c in grid_cells(GRID)] and manifest["preset"] is None


def test_jobs_need_a_picklable_cell_function(tmp_path):
    with pytest.raises(GmixError, match="jobs > 1 sends each cell to a worker process, but it cannot be pickled"):
        run_sweep(BASE, grid=GRID, out=tmp_path, train_fn=lambda config, **kw: None, jobs=2)
