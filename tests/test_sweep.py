"""gmix sweep: grid cells, resuming where it stopped, one CSV, the figure, and the command line."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from gmix_curvature.cli import main
from gmix_curvature.errors import GmixError
from gmix_curvature.sweep import grid_cells, plot_sweep, run_sweep
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
    (tmp_path / "batch_size=64_noise=none_seed=0").mkdir()
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
