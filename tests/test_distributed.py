"""DDP under torchrun (2 gloo processes on CPU) computes what one process computes with accumulation.

One ``torchrun`` launch runs several trainings in turn (the process group is set up once): sample-wise
mixing (global π, each rank its slice), device-wise mixing (the communication hook scales each rank's
bucket by K·π_k), and a run killed after its first checkpoint; a second launch resumes that one. The
single-process references use micro-batches of the per-rank size, so every forward pass sees the same
samples; the models have no BatchNorm, whose running statistics DDP takes from rank 0 alone. All in
float64; parameters must agree to 1e-12 (the only difference is the order of a two-term sum).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gmix_curvature.checkpoint import read_checkpoint
from gmix_curvature.train import TrainConfig, train

BASE = {
    "model": "mlp", "model_kwargs": {"hidden": [16]}, "data": "digits", "batch_size": 64, "steps": 4,
    "eval_every": 2, "checkpoint_every": 2, "optimizer": "nesterov", "lr": 0.2, "momentum": 0.9,
    "weight_decay": 1e-3, "noise": "gaussian", "kappa_ratio": 2.0, "dtype": "float64", "device": "cpu",
    "seed": 3, "progress": False,
}  # fmt: skip
CASES = {
    "sample": {"mixing": "sample"},
    "device": {"mixing": "device", "groups": 2},
    "device-lars": {"mixing": "device", "groups": 2, "optimizer": "lars", "lr": 1.0, "trust_coefficient": 0.02},
}

DRIVER = textwrap.dedent(
    """
    import json, sys
    from gmix_curvature.train import TrainConfig, train

    class Killed(Exception):
        pass

    def kill_at(n):
        def callback(step, final):
            if step == n:
                raise Killed
        return callback

    for run in json.load(open(sys.argv[1])):
        config = TrainConfig.from_dict(run["config"])
        try:
            train(config, resume=run["resume"], callback=kill_at(run["kill_at"]) if run["kill_at"] else None)
        except Killed:
            pass
    # Tear the process group down here and leave without the interpreter's finalisation: under load, gloo's
    # worker threads still held tensors while Python finalised and a rank aborted with SIGABRT ("terminate
    # called without an active exception") after its runs were done, 1 launch in 3 at load average 11-16.
    import os, torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
    """
)


def torchrun(tmp_path, runs, name):
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(runs))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(driver), str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(out):
    return read_checkpoint(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    runs = [{"config": {**BASE, **over, "out": str(tmp / name)}, "resume": False, "kill_at": 0}
            for name, over in CASES.items()]  # fmt: skip
    runs.append({"config": {**BASE, **CASES["device"], "out": str(tmp / "killed")}, "resume": False, "kill_at": 4})
    torchrun(tmp, runs, "first")
    assert weights(tmp / "killed")["step"] == 2  # rank 0 checkpointed step 2, then the run was killed
    torchrun(tmp, [{**runs[-1], "resume": True, "kill_at": 0}], "resume")
    return tmp


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_equals_single_process_accumulation(case, ddp_runs, tmp_path):
    single = train(TrainConfig.from_dict({**BASE, **CASES[case], "micro_batch_size": 32, "out": str(tmp_path)}))
    ddp = weights(ddp_runs / case)
    assert ddp["step"] == 4
    ref = single.model.state_dict()
    for name, value in ddp["model"].items():
        torch.testing.assert_close(value, ref[name], rtol=1e-12, atol=1e-12, msg=name)
    # the mixing mattered: plain averaging ends elsewhere
    plain = train(TrainConfig.from_dict({**BASE, **CASES[case], "noise": "none", "micro_batch_size": 32}))
    assert not torch.allclose(plain.model.state_dict()["net.1.weight"], ddp["model"]["net.1.weight"])


def test_ddp_resume_is_exact(ddp_runs):
    straight, resumed = weights(ddp_runs / "device"), weights(ddp_runs / "killed")
    assert resumed["step"] == 4
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    lines = (ddp_runs / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "step"]
    assert steps == [1, 2, 3, 4]  # rank 0 alone writes metrics, once per step, across the resume


def test_a_process_group_created_here_is_destroyed_at_exit(monkeypatch):
    """Without it, a torchrun process that ends without destroy_process_group can abort in gloo's threads
    during interpreter finalisation (seen here: rank 0 SIGABRT after its runs were done)."""
    import gmix_curvature.distributed as d

    state = {"initialized": False, "destroyed": 0}
    registered = []

    def init(backend):
        state["initialized"] = True

    def destroy():
        state["initialized"] = False
        state["destroyed"] += 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(d.dist, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(d.dist, "init_process_group", init)
    monkeypatch.setattr(d.dist, "destroy_process_group", destroy)
    monkeypatch.setattr(d.atexit, "register", registered.append)
    ctx = d.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size) == (0, 2) and registered == [d._destroy_at_exit]
    d.init_distributed("cpu")  # already initialised: nothing more registered
    assert registered == [d._destroy_at_exit]
    registered[0]()
    registered[0]()  # the caller (or the first call) destroyed it already: a no-op
    assert state["destroyed"] == 1
