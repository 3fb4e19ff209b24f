"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop ``gmix train`` after a whole optimizer step with its checkpoint
written (exit 75), and the resumed run ends bit-identical to an uninterrupted one — parameters and every metrics
row. A second SIGINT stops at once (exit 130) with the last checkpoint intact. Under torchrun a signal to one
rank stops both at the same step.

The signalled runs are real ``gmix train`` processes (the CLI's ``main``; a tiny MLP on the embedded digits,
float64, one thread; each step held to at least 3 ms so that a signal sent on seeing progress lands mid-run);
each test waits until the metrics show progress, then signals. Resumes and the uninterrupted reference run in
this process, with one thread: the same arithmetic, bit for bit."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from gmix_curvature.checkpoint import read_checkpoint
from gmix_curvature.data import load_dataset
from gmix_curvature.errors import EXIT_INTERRUPTED, EXIT_KILLED, TrainingInterrupted
from gmix_curvature.train import TrainConfig, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ARGS = ["--data", "digits", "--model", "mlp", "--batch-size", "32", "--steps", "300", "--eval-every", "25",
        "--checkpoint-every", "50", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--noise", "gaussian",
        "--kappa-ratio", "1", "--dtype", "float64", "--device", "cpu", "--seed", "1", "--no-progress"]  # fmt: skip

DRIVER = textwrap.dedent(
    """
    # `gmix train ARGS`, each step at least 3 ms long (so that a signal sent on seeing progress lands mid-run even
    # on a loaded machine), and a checkpoint write held up, as by a slow disk, while a stop is pending (so that a
    # second SIGINT lands during it)
    import signal, sys, time
    import gmix_curvature.train as engine
    from gmix_curvature.cli import main

    real_write, real_save = engine.Recorder.write, engine.save_checkpoint

    def slow_write(self, record):
        time.sleep(0.003)
        real_write(self, record)

    def slow_save(payload, path):
        stop = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
        if "--slow-disk" in sys.argv and stop is not None and stop.requested:
            print("saving", file=sys.stderr, flush=True)
            time.sleep(120)
        return real_save(payload, path)

    engine.Recorder.write, engine.save_checkpoint = slow_write, slow_save
    sys.exit(main(["train", *[a for a in sys.argv[1:] if a != "--slow-disk"]]))
    """
)


def start(tmp_path, out, *extra):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(driver), *ARGS, "--out", str(out), *extra], env=ENV,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_steps(out, n, proc, timeout=120):
    """Until metrics.jsonl holds n step records (the run is under way)."""
    path, deadline = out / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if path.exists() and path.read_text().count('"kind": "step"') >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"no progress in {out}")


@contextlib.contextmanager
def one_thread():
    """In this process, the subprocesses' single thread (OMP_NUM_THREADS=1): the same floating-point sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_in_process(out, resume=False):
    """What `gmix train ARGS --out OUT [--resume]` runs, here."""
    from gmix_curvature._cli.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config, resume = config_from_args(parser.parse_args([*ARGS, "--out", str(out), *(["--resume"] if resume else [])]))
    with one_thread():
        return train(config, resume=resume)


def assert_same_run(a, b, steps=300):
    """The same parameters, bit for bit, and the same metrics rows."""
    ca, cb = read_checkpoint(a / "checkpoint.pt"), read_checkpoint(b / "checkpoint.pt")
    assert ca["step"] == cb["step"] == steps
    for name, value in ca["model"].items():
        assert torch.equal(value, cb["model"][name]), name
    assert rows(a) == rows(b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "straight"
    train_in_process(out)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_checkpoints_exits_75_and_the_resumed_run_is_the_uninterrupted_one(sig, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(tmp_path, out)
    wait_for_steps(out, 20, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED == 75
    n = read_checkpoint(out / "checkpoint.pt")["step"]
    assert 20 <= n < 300
    assert [r["step"] for r in rows(out) if r["kind"] == "step"] == list(range(1, n + 1))  # the metrics end there
    last = err.strip().splitlines()[-1]
    assert f"stopped by {sig.name} after step {n} of 300" in last
    assert last.endswith(f"resume with: gmix train --resume --out {out}")
    train_in_process(out, resume=True)  # what `gmix train --resume --out OUT` runs
    assert_same_run(uninterrupted, out)


def test_a_second_sigint_stops_at_once_and_the_last_checkpoint_is_intact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(tmp_path, out, "--slow-disk")
    wait_for_steps(out, 60, proc)  # past the checkpoint of step 50
    before = (out / "checkpoint.pt").read_bytes()
    proc.send_signal(signal.SIGINT)
    lines = []
    while not lines or lines[-1] != "saving":
        lines.append(proc.stderr.readline().strip())
        assert lines[-1] or proc.poll() is None, lines
    assert "SIGINT: stopping after this optimizer step" in lines[0]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_KILLED == 130
    assert err.strip().splitlines()[-1] == "gmix train: interrupted"
    assert (out / "checkpoint.pt").read_bytes() == before  # the stop's checkpoint was never written
    assert read_checkpoint(out / "checkpoint.pt")["step"] % 50 == 0
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    train_in_process(out, resume=True)
    assert_same_run(uninterrupted, out)  # the metrics written after that checkpoint were dropped on resume


class _SignalAt:
    """Training data that sends this process ``sig`` while the ``at``-th training batch is drawn."""

    def __init__(self, ds, at, sig):
        self.ds, self.at, self.sig, self.calls = ds, at, sig, 0

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def __len__(self):
        return len(self.ds)

    def get_batch(self, indices, generator=None, *, train=False):
        if train:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), self.sig)
        return self.ds.get_batch(indices, generator, train=train)


def test_in_process_stop_between_evaluations_resumes_exactly_and_restores_the_handlers(tmp_path):
    """train() itself: a stop between two evaluations (the running training loss is checkpointed), a torn last
    metrics line (a kill mid-write) repaired on resume, and the caller's signal handlers put back."""
    train_ds, test_ds = load_dataset("digits", "train"), load_dataset("digits", "test")
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [8]}, batch_size=64, steps=9, eval_every=4,
                      checkpoint_every=4, noise="rademacher", kappa_ratio=1.0, dtype="float64", device="cpu",
                      progress=False, seed=2)  # fmt: skip
    straight = train(dataclasses.replace(cfg, out=str(tmp_path / "a")), datasets=(train_ds, test_ds))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    out = tmp_path / "b"
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after step 6 of 9") as e:
        train(dataclasses.replace(cfg, out=str(out)), datasets=(_SignalAt(train_ds, 6, signal.SIGTERM), test_ds))
    assert {s: signal.getsignal(s) for s in before} == before
    assert e.value.step == 6 and e.value.checkpoint == out / "checkpoint.pt"
    copy = pickle.loads(pickle.dumps(e.value))  # as a sweep's worker process sends it to its parent
    assert (str(copy), copy.signal_name, copy.out) == (str(e.value), "SIGTERM", out)
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 6
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 7, "lo')  # torn by a kill
    resumed = train(dataclasses.replace(cfg, out=str(out)), resume=True, datasets=(train_ds, test_ds))
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert rows(tmp_path / "a") == rows(out)
    assert straight.final == resumed.final


DDP_DRIVER = textwrap.dedent(
    """
    # one torchrun rank, one launch: the uninterrupted run (train()); `gmix train ARGS --out RUN`, each step at least
    # 3 ms long, until a signal stops it (every rank prints its stop line and exit code, so the test can compare
    # them; the process group is kept, as it cannot be set up twice in one launch); rank 0 records what the stop
    # left on disk; then `gmix train ARGS --out RUN --resume`
    import dataclasses, json, os, sys, time
    from pathlib import Path
    import torch.distributed as dist
    import gmix_curvature.cli as cli
    import gmix_curvature.train as engine
    from gmix_curvature._cli.train import add_arguments, config_from_args
    from gmix_curvature.checkpoint import read_checkpoint

    tmp, straight, out, args = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
    parser = cli.argparse.ArgumentParser()
    add_arguments(parser)
    config, _ = config_from_args(parser.parse_args(args))
    engine.train(dataclasses.replace(config, out=straight))
    rank = os.environ["RANK"]
    (tmp / f"pid{rank}").write_text(str(os.getpid()))
    real_write, close = engine.Recorder.write, cli._close_process_group

    def slow_write(self, record):
        time.sleep(0.003)
        real_write(self, record)

    engine.Recorder.write = slow_write
    cli._is_rank0, cli._close_process_group = (lambda: True), dist.barrier
    code = cli.main(["train", *args, "--out", str(out)])
    print(f"rank {rank} exit {code}", file=sys.stderr, flush=True)
    if rank == "0":
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "step"]
        stopped = {"checkpoint": read_checkpoint(out / "checkpoint.pt")["step"], "metrics": steps}
        (tmp / "stopped.json").write_text(json.dumps(stopped))
    dist.barrier()
    engine.Recorder.write = real_write
    code = cli.main(["train", *args, "--out", str(out), "--resume"])
    close()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)  # the process group is torn down; skip the interpreter's finalisation of gloo's threads
    """
)
DDP_ARGS = [a if a not in ("32", "300") else {"32": "64", "300": "150"}[a] for a in ARGS]


def test_under_torchrun_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    out, straight, driver = tmp_path / "run", tmp_path / "straight", tmp_path / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(tmp_path), str(straight), str(out), *DDP_ARGS]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 10, proc)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGUSR1)  # rank 1 only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]  # the resume's
    stops = re.findall(r"gmix train: stopped by SIGUSR1 after step (\d+) of 150", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]  # rank 0 too, at the same step
    assert sorted(re.findall(r"rank (\d) exit (\d+)", err)) == [("0", "75"), ("1", "75")]
    n, stopped = int(stops[0]), json.loads((tmp_path / "stopped.json").read_text())
    assert stopped == {"checkpoint": n, "metrics": list(range(1, n + 1))} and n < 150
    assert_same_run(straight, out, steps=150)


def test_train_in_another_thread_installs_no_handlers():
    """Python takes signal handlers in the main thread only: elsewhere train() runs without them, and leaves them."""
    before = signal.getsignal(signal.SIGTERM)
    result, seen = [], []

    def run():
        cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [4]}, batch_size=64, steps=2, device="cpu",
                          progress=False, seed=0)  # fmt: skip
        result.append(train(cfg, callback=lambda step, _: seen.append(signal.getsignal(signal.SIGTERM))))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert result and result[0].steps == 2 and seen == [before]  # one evaluation, at the end
    assert signal.getsignal(signal.SIGTERM) is before
