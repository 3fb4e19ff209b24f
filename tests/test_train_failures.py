"""Write failures stop a run cleanly: a checkpoint that cannot be written (disk full, permission denied) or metrics
that cannot be appended stop the run with one line naming the file and the OS error (``gmix`` exit 74); the
previous checkpoint stays intact and loadable, and resuming from it ends where the uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import pytest
import torch

import gmix_curvature.checkpoint as ckpt_mod
from gmix_curvature.checkpoint import read_checkpoint
from gmix_curvature.cli import main
from gmix_curvature.errors import EXIT_WRITE_FAILED, RunWriteError
from gmix_curvature.train import TrainConfig, train

CFG = TrainConfig(model="mlp", batch_size=64, steps=5, eval_every=1, checkpoint_every=1,
                  noise="gaussian", kappa_ratio=1.0, dtype="float64", device="cpu", progress=False, seed=4)  # fmt: skip
ARGS = ["train", "--model", "mlp", "--batch-size", "64", "--steps", "5", "--eval-every", "1", "--checkpoint-every",
        "1", "--noise", "gaussian", "--kappa-ratio", "1", "--dtype", "float64", "--device", "cpu", "--seed", "4",
        "--no-progress"]  # fmt: skip


def _disk_full(path, f):
    f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _permission_denied(path, f):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


# (id, what the third torch.save does, the OS error in the message)
FAILURES = {"disk-full": (_disk_full, "[Errno 28] No space left on device"),
            "permission": (_permission_denied, "[Errno 13] Permission denied")}  # fmt: skip


@pytest.fixture
def third_save_fails(monkeypatch, request):
    """torch.save as the checkpoint module calls it: the third call (the checkpoint of step 3) fails."""
    fail, _ = FAILURES[request.param]
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(obj.get("step"))
        if len(calls) == 3:
            fail(getattr(f, "name", f), f)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    return request.param


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("third_save_fails", list(FAILURES), indirect=True)
def test_a_failed_checkpoint_write_keeps_the_previous_one(third_save_fails, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == EXIT_WRITE_FAILED == 74
    err = capsys.readouterr().err.strip()
    assert err == (f"gmix train: error: cannot write the checkpoint {out / 'checkpoint.pt'}: "
                   f"{FAILURES[third_save_fails][1]}; the checkpoint of step 2 is intact")  # fmt: skip
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()  # the disk has room again: resume, and end where the uninterrupted run ends
    resumed = train(dataclasses.replace(CFG, out=str(out)), resume=True)
    straight = train(dataclasses.replace(CFG, out=str(tmp_path / "straight")))
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert rows(out) == rows(tmp_path / "straight")


def test_metrics_that_cannot_be_written_stop_the_run_before_the_checkpoint_runs_ahead(tmp_path):
    out = tmp_path / "run"

    def break_metrics(step, _):
        if step == 2:  # metrics.jsonl becomes a directory: the next append fails with EISDIR
            (out / "metrics.jsonl").unlink()
            (out / "metrics.jsonl").mkdir()

    with pytest.raises(RunWriteError, match=r"cannot write the metrics .*metrics.jsonl: \[Errno 21\] Is a directory"):
        train(dataclasses.replace(CFG, out=str(out)), callback=break_metrics)
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 2
