"""Checkpoints load without running code: a malicious pickle is refused by every reader (library and CLI) and
its payload never runs; ``trust=True`` / ``--trust-checkpoint`` still loads a legitimately pickled module;
``.safetensors`` state_dicts read and trace like their ``.pt`` twins."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

from gmix_curvature.checkpoint import load_checkpoint, read_checkpoint
from gmix_curvature.cli import main
from gmix_curvature.errors import CheckpointError
from gmix_curvature.models import build_model

MLP_KW = {"hidden": [8]}


class ShellPayload:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class PayloadModule(nn.Linear):
    """A "module" whose unpickling (``__setstate__``) writes the marker file."""

    def __init__(self, marker):
        super().__init__(2, 2)
        self.marker = str(marker)

    def __setstate__(self, state):
        super().__setstate__(state)
        with open(self.marker, "w") as f:
            f.write("ran")


def _dict_with_payload(path, marker):
    torch.save({"model": {"w": torch.zeros(2)}, "extra": ShellPayload(marker)}, path)


def _plain_pickle(path, marker):  # not a torch.save file: pickle.dump at protocol 4
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(2)}, "extra": ShellPayload(marker)}, f, protocol=4)


class ExecPayload:
    """Unpickling this calls exec, which creates the marker file (the payload of a builtin, beside tensors)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _plain_pickle_exec(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(2), "extra": ExecPayload(marker)}, f, protocol=4)


def _module_with_payload(path, marker):
    torch.save(PayloadModule(marker), path)


MALICIOUS = {"dict-with-reduce": _dict_with_payload, "plain-pickle": _plain_pickle,
             "plain-pickle-exec": _plain_pickle_exec, "module": _module_with_payload}  # fmt: skip
# what the one-line refusal names: the callable or class that would have run
NAMED = {"dict-with-reduce": "posix.system", "plain-pickle": "posix.system", "plain-pickle-exec": "builtins.exec",
         "module": f"{__name__}.PayloadModule"}  # fmt: skip


@pytest.fixture(params=list(MALICIOUS))
def malicious(request, tmp_path):
    """(path, marker, shape): a malicious checkpoint and the file its payload would create."""
    marker = tmp_path / "PAYLOAD-RAN"
    path = tmp_path / "evil.pt"
    MALICIOUS[request.param](path, marker)
    return path, marker, request.param


@pytest.mark.parametrize("shape", list(MALICIOUS))
def test_the_payloads_are_live(shape, tmp_path):
    """The control: a full unpickle of each file does run its payload (so the refusals below mean something)."""
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    MALICIOUS[shape](path, marker)
    with open(path, "rb") as f:
        if shape.startswith("plain-pickle"):
            pickle.load(f)
        else:
            torch.load(f, weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_in_one_line(malicious):
    path, marker, shape = malicious
    with pytest.raises(CheckpointError, match=r"needs full unpickling.*--trust-checkpoint \(trust=True\)") as e:
        load_checkpoint(path, model="mlp", input_shape=(1, 8, 8), model_kwargs=MLP_KW)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert f"(it names {NAMED[shape]})" in str(e.value)
    assert not marker.exists()


def _train_dir(path):
    """A run directory whose checkpoint.pt is the malicious file."""
    run = path.parent / "run"
    run.mkdir()
    os.replace(path, run / "checkpoint.pt")
    return run


def _sweep_dir(path):
    """A sweep's directory whose one cell (seed=0) was interrupted: the malicious file is its checkpoint."""
    os.makedirs(path.parent / "sweep" / "seed=0")
    os.replace(path, path.parent / "sweep" / "seed=0" / "checkpoint.pt")
    return path.parent / "sweep"


def _table1_dir(path):
    """A Table 1 output directory whose runs were interrupted: the malicious file is every run's checkpoint."""
    from gmix_curvature.table1 import table1_preset

    out = path.parent / "table1"
    for method in table1_preset("micro").methods:
        os.makedirs(out / f"{method}-seed0")
        (out / f"{method}-seed0" / "checkpoint.pt").write_bytes(path.read_bytes())
    return out


# every command that reads a checkpoint: (id, argv given the malicious file)
COMMANDS = {
    "trace": lambda p: ["trace", str(p), "--data", "digits", "--model", "mlp", "--model-kwargs", json.dumps(MLP_KW),
                        "--input-shape", "1,8,8", "--samples", "8", "--method", "exact"],
    "train-resume": lambda p: ["train", "--resume", "--out", str(_train_dir(p)), "--steps", "2", "--no-progress"],
    "theory": lambda p: ["theory", "--checkpoint", str(p), "--model", "mlp", "--num-samples", "16"],
    "sweep": lambda p: ["sweep", "digits", "--out", str(_sweep_dir(p)), "--axis", "seed=0", "--set", "steps=2",
                        "--no-plot"],
    "table1": lambda p: ["table1", "--preset", "micro", "--seeds", "1", "--kappa-ratio", "1", "--out",
                         str(_table1_dir(p)), "--no-plot", "--quiet"],
}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_with_exit_2(command, malicious, capsys):
    path, marker, _ = malicious
    code = main(COMMANDS[command](path))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "needs full unpickling" in err and "--trust-checkpoint" in err
    assert not marker.exists()


@pytest.mark.parametrize("command", ["train-resume", "sweep", "table1"])
def test_the_opt_in_reaches_the_unpickler(command, tmp_path, capsys):
    """With --trust-checkpoint the file is unpickled in full (the payload runs: that is what trusting means), then
    refused as what it is, not a gmix training checkpoint."""
    path, marker = tmp_path / "evil.pt", tmp_path / "PAYLOAD-RAN"
    _dict_with_payload(path, marker)
    assert main([*COMMANDS[command](path), "--trust-checkpoint"]) == 2
    assert "is not a gmix training checkpoint" in capsys.readouterr().err
    assert marker.exists()


def test_junk_is_not_a_checkpoint_and_trust_does_not_change_that(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a checkpoint at all")
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
            read_checkpoint(p, trust=trust)


@pytest.fixture
def mlp_files(tmp_path):
    """One trained-looking MLP saved three ways: state_dict .pt, .safetensors, whole pickled module."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), **MLP_KW)
    paths = {"pt": tmp_path / "w.pt", "safetensors": tmp_path / "w.safetensors", "module": tmp_path / "net.pt"}
    torch.save(net.state_dict(), paths["pt"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, paths["safetensors"])
    torch.save(net, paths["module"])
    return net, paths


def test_trust_loads_a_legitimately_pickled_module(mlp_files, tmp_path, capsys):
    net, paths = mlp_files
    with pytest.raises(CheckpointError, match="needs full unpickling"):
        load_checkpoint(paths["module"])
    loaded, config = load_checkpoint(paths["module"], trust=True)
    assert config["source"] == "module" and not loaded.training
    for (k, v), w in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, w), k
    args = ["trace", str(paths["module"]), "--data", "digits", "--samples", "16", "--method", "empirical_fisher"]
    assert main(args) == 2
    assert main([*args, "--trust-checkpoint"]) == 0
    assert "empirical_fisher" in capsys.readouterr().out
    theory = ["theory", "--checkpoint", str(paths["module"]), "--num-samples", "16"]
    assert main(theory) == 2
    assert main([*theory, "--trust-checkpoint"]) == 0
    assert "gradient noise scale" in capsys.readouterr().out


def test_safetensors_state_dict_loads_and_traces_like_the_pt(mlp_files, tmp_path, capsys):
    net, paths = mlp_files
    common = dict(model="mlp", input_shape=(1, 8, 8), model_kwargs=MLP_KW)
    a, cfg_a = load_checkpoint(paths["pt"], **common)
    b, cfg_b = load_checkpoint(paths["safetensors"], **common)
    assert cfg_a == cfg_b and cfg_b["num_classes"] == 10
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    reports = []
    for kind in ("pt", "safetensors"):
        out = tmp_path / f"{kind}.json"
        code = main(["trace", str(paths[kind]), "--model", "mlp", "--model-kwargs", json.dumps(MLP_KW),
                     "--input-shape", "1,8,8", "--data", "digits", "--samples", "32", "--method", "empirical_fisher",
                     "--json", str(out)])  # fmt: skip
        assert code == 0
        reports.append([{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(out.read_text())["results"]])
    assert reports[0] == reports[1] and reports[0][0]["value"] > 0


def test_a_broken_safetensors_file_is_one_line(tmp_path):
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(p, model="mlp")
