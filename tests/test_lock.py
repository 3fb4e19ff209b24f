"""One writer per run directory (gmix_curvature/lock.py): a second writer is refused in one line (exit 2), a stale
lock of a process that no longer runs is taken over with a message, the lock is released however the run ends,
and a process already holding it (a sweep cell's lock, then the run inside) is not refused by itself."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from gmix_curvature.cli import main
from gmix_curvature.errors import GmixError, RunLocked
from gmix_curvature.lock import LOCK_NAME, lock_holder, run_lock
from gmix_curvature.train import TrainConfig, train

HOST = socket.gethostname()
RUN = ["--data", "digits", "--model", "mlp", "--batch-size", "64", "--steps", "1", "--device", "cpu", "--no-progress"]

HOLDER = textwrap.dedent(
    """
    # hold an flock on the lock file and write TEXT into it ("PID" becomes this process's pid), then wait
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, sys.argv[2].replace("PID", str(os.getpid())).encode())
    print("held", flush=True)
    time.sleep(120)
    """
)


def dead_pid():
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


@pytest.fixture
def hold(tmp_path):
    """hold(out, text): another process holds OUT/.lock with ``text`` in it, for the test."""
    procs = []

    def start(out, text):
        out.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_NAME), text], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def config(out):
    return TrainConfig(model="mlp", model_kwargs={"hidden": [4]}, batch_size=64, steps=1, device="cpu",
                       progress=False, out=str(out))  # fmt: skip


def test_a_second_writer_gets_one_line_and_exit_2(tmp_path, hold, capsys):
    out = tmp_path / "run"
    holder = hold(out, f"{HOST} PID")
    assert main(["train", *RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"gmix train: error: {out} is being written by process {holder.pid} on {HOST} "
                   f"(lock {out / LOCK_NAME}); wait for it to end or stop it")  # fmt: skip
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()
    with pytest.raises(RunLocked, match=f"process {holder.pid} on {HOST}"):
        train(config(out))
    with pytest.raises(RunLocked):
        train(config(out), resume=True)  # refused before anything is read


def test_another_hosts_lock_is_never_taken_over(tmp_path, hold):
    out = tmp_path / "run"
    hold(out, "node17.cluster 4242")
    with pytest.raises(RunLocked, match="is being written by process 4242 on node17.cluster"):
        train(config(out))


# a stale lock: (id, how it is left behind). A killed writer's flock dies with it, leaving its "HOST PID";
# a flock still held by a process that inherited the descriptor, naming a writer that is gone, is broken.
STALE = {
    "killed-writer": lambda out, hold: (out / LOCK_NAME).write_text(f"{HOST} {dead_pid()}\n"),
    "inherited-flock": lambda out, hold: hold(out, f"{HOST} {dead_pid()}"),
}


@pytest.mark.parametrize("case", list(STALE))
def test_a_stale_lock_is_taken_over_with_a_message(case, tmp_path, hold, capsys):
    out = tmp_path / "run"
    out.mkdir()
    STALE[case](out, hold)
    stale_pid = lock_holder(out / LOCK_NAME)[1]
    result = train(config(out))
    assert result.steps == 1 and (out / "checkpoint.pt").exists()
    err = capsys.readouterr().err
    assert f"{out}: taking over the lock of process {stale_pid}, which no longer runs on {HOST}" in err


def _free(path):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while anyone holds it
        return True
    finally:
        os.close(fd)


def test_the_lock_is_released_however_the_run_ends(tmp_path):
    out = tmp_path / "run"
    train(config(out))
    assert _free(out / LOCK_NAME) and lock_holder(out / LOCK_NAME) == (None, None)
    with pytest.raises(GmixError, match="differs from the checkpoint's: lr"):
        train(TrainConfig(**{**config(out).to_dict(), "lr": 0.5, "betas": (0.9, 0.999)}), resume=True)
    assert _free(out / LOCK_NAME) and lock_holder(out / LOCK_NAME) == (None, None)


def test_the_holder_takes_its_own_lock_again(tmp_path):
    """A sweep holds each cell's lock (same file, same format) and trains inside it, in the same process."""
    from gmix_curvature.sweep import cell_lock

    out = tmp_path / "cell"
    with cell_lock(out) as mine:
        assert mine
        assert train(config(out)).steps == 1
        assert lock_holder(out / LOCK_NAME) == (HOST, os.getpid())  # the enclosing lock is left as it was
    with run_lock(out) as path, run_lock(out):
        assert lock_holder(path) == (HOST, os.getpid())
