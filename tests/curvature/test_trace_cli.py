"""``gmix trace`` end to end: on a checkpoint of ``gmix train``, on a plain state_dict, under torchrun with
2 gloo ranks (the single-process result), and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gmix_curvature.checkpoint import load_checkpoint, save_checkpoint
from gmix_curvature.cli import main
from gmix_curvature.curvature import exact_ggn_trace
from gmix_curvature.data import load_dataset
from gmix_curvature.models import build_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "gmix_curvature", "train", "--data", "digits", "--model", "digits_cnn", "--steps", "5",
         "--batch-size", "64", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def _trace(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["trace", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_trace_of_a_gmix_train_checkpoint(run_dir, tmp_path, capsys):
    out = tmp_path / "trace.json"
    code, stdout, _ = _trace([str(run_dir), "--method", "exact", "--samples", "48", "--seed", "3", "--json",
                              str(out), "--no-progress"], capsys)  # fmt: skip
    assert code == 0
    assert stdout.splitlines()[0].split()[:3] == ["method", "quantity", "Tr"]
    report = json.loads(out.read_text())
    (result,) = report["results"]
    net, _ = load_checkpoint(run_dir)
    ds = load_dataset("digits", "train").subset(48, torch.Generator().manual_seed(3))
    assert result["value"] == pytest.approx(exact_ggn_trace(net, ds.tensors()).value, rel=1e-6)
    assert result["bn_mode"] == "eval" and result["n_samples"] == 48 and report["data"]["name"] == "digits"
    assert "Eq. 5" in report["convention"]


def test_trace_of_a_plain_state_dict(tmp_path, capsys):
    net = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[8])
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    code, stdout, _ = _trace([str(tmp_path / "weights.pt"), "--model", "mlp", "--model-kwargs", '{"hidden": [8]}',
                              "--input-shape", "1,8,8", "--data", "digits", "--samples", "32", "--method", "fisher_is",
                              "--probes", "4", "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and "fisher_is" in stdout


@pytest.fixture
def digits_checkpoint(tmp_path):
    def make(num_classes: int = 10) -> str:
        net = build_model("digits_cnn", num_classes=num_classes, input_shape=(1, 8, 8), width=4)
        cfg = {"model": "digits_cnn", "model_kwargs": {"width": 4}, "num_classes": num_classes,
               "input_shape": [1, 8, 8], "data": "digits", "data_dir": None}  # fmt: skip
        path = tmp_path / f"c{num_classes}" / "checkpoint.pt"
        save_checkpoint({"format": "gmix-checkpoint", "model": net.state_dict(), "config": cfg}, path)
        return str(path)

    return make


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "does not exist"),
        ("not-a-checkpoint", "is not a PyTorch checkpoint"),
        ("other-architecture", "holds a digits_cnn model, not resnet18"),
        ("state-dict-of-another-architecture", "does not fit the architecture"),
        ("labels-out-of-range", "labels out of range"),
        ("empty-data", "--samples must be >= 1"),
        ("bad-method", "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, match, tmp_path, digits_checkpoint, capsys):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save(build_model("mlp", num_classes=10, input_shape=(1, 8, 8)).state_dict(), tmp_path / "mlp.pt")
    args = {
        "missing": [str(tmp_path / "nope.pt")],
        "not-a-checkpoint": [str(tmp_path / "junk.pt")],
        "other-architecture": [digits_checkpoint(), "--model", "resnet18"],
        "state-dict-of-another-architecture": [str(tmp_path / "mlp.pt"), "--model", "digits_cnn", "--data", "digits",
                                               "--input-shape", "1,8,8"],
        "labels-out-of-range": [digits_checkpoint(5)],
        "empty-data": [digits_checkpoint(), "--samples", "0"],
        "bad-method": [digits_checkpoint(), "--method", "lanczos"],
    }[case]  # fmt: skip
    try:
        code = main(["trace", "--method", "exact", "--samples", "16", "--no-progress", *args])
    except SystemExit as exc:  # argparse's own one-line error
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert match in err


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_give_the_single_process_result(digits_checkpoint, tmp_path):
    ckpt = digits_checkpoint()
    common = [ckpt, "--samples", "64", "--batch-size", "16", "--method", "fisher_is", "--probes", "4", "--seed", "1",
              "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "gmix_curvature", "trace", *common, "--json",
                             str(tmp_path / "one.json")], capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    with socket.socket() as sock:  # a free port: other test runs may hold the default one
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            port, "-m", "gmix_curvature", "trace", *common, "--json", str(tmp_path / "two.json")],
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-2000:]
    one = json.loads((tmp_path / "one.json").read_text())["results"][0]
    two = json.loads((tmp_path / "two.json").read_text())["results"][0]
    assert two["n_samples"] == one["n_samples"] == 64
    assert two["value"] == pytest.approx(one["value"], rel=1e-6)  # float32 sums in another order
    assert two["stderr"] == pytest.approx(one["stderr"], rel=1e-4)
