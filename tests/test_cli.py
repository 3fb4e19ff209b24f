"""The ``gmix`` command line: help, version, one-line errors with exit code 2, and a run end to end."""

from __future__ import annotations

import json

import pytest

from gmix_curvature import __version__
from gmix_curvature._cli.train import _OPTIONS
from gmix_curvature.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_train_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag, *_ in _OPTIONS:
        assert flag in text
    for flag in ("--preset", "--out", "--resume", "--config"):
        assert flag in text


def test_train_end_to_end_and_rerun_from_saved_config(tmp_path, gmix):
    out = tmp_path / "run"
    r = gmix("train", "--preset", "digits", "--steps", "3", "--noise", "rademacher", "--kappa-ratio", "1",
             "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "test_acc=" in r.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["noise"] == "rademacher" and cfg["kappa"] == pytest.approx(1 / 512) and cfg["steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"step", "eval"}
    # Rademacher: γ_t = 1 + r² + 2κΣε_b, mean 1 + r² = 2 and standard deviation 2r/√B
    assert all(abs(r["gamma"] - 2.0) < 5 * 2 / 512**0.5 for r in records if r["kind"] == "step")
    # the saved configuration redoes the run exactly
    r2 = gmix("train", "--config", str(out / "config.json"), "--out", str(tmp_path / "again"), "--no-progress")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.splitlines()[0] == r.stdout.splitlines()[0]
    # resume of a finished run changes nothing and succeeds
    r3 = gmix("train", "--out", str(out), "--resume", "--no-progress")
    assert r3.returncode == 0, r3.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--preset", "nope", "--steps", "1"], "unknown preset 'nope'"),
        (["train", "--noise", "laplace", "--steps", "1"], "unknown noise kind 'laplace'"),
        (["train", "--data", "cifar10", "--data-dir", "/no/such/dir", "--steps", "1"], "does not exist"),
        (["train", "--steps", "1", "--epochs", "2"], "give --steps or --epochs, not both"),
        (["train", "--resume", "--out", "/no/such/run"], "nothing to resume"),
        (["train", "--batch-size", "many"], "invalid int value: 'many'"),
        (["train", "--config", "/no/such.json"], "config file /no/such.json does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_corrupt_checkpoint_via_cli(tmp_path, gmix):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    r = gmix("train", "--out", str(tmp_path), "--resume", "--steps", "2")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "is not a PyTorch checkpoint" in r.stderr


def test_divergence_exits_3_with_a_message(tmp_path, gmix):
    r = gmix("train", "--steps", "30", "--lr", "1e30", "--schedule", "constant", "--out", str(tmp_path),
             "--no-progress", "--checkpoint-every", "1")
    assert r.returncode == 3, r.stderr
    assert "non-finite loss" in r.stderr and r.stderr.count("\n") == 1
