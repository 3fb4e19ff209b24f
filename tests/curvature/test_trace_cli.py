"""``gmix trace`` end to end: on a checkpoint of ``gmix train``, on a plain state_dict, on every data set
``gmix train`` reads (an ImageNet ImageFolder and any ImageFolder, Multi30k with a Fig. 3 Transformer and its
padding), with the mse/bce losses, under torchrun with 2 gloo ranks (the single-process result), and bad input as
one line with exit code 2."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from large_data import write_imagefolder, write_multi30k
from torch import nn

from gmix_curvature.checkpoint import load_checkpoint, save_checkpoint
from gmix_curvature.cli import main
from gmix_curvature.curvature import exact_ggn_trace
from gmix_curvature.curvature.report import EvalBatches, load_trace_data
from gmix_curvature.data import DATASETS, load_dataset
from gmix_curvature.data_large import PAD, load_imagenet, load_multi30k
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


def dense_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy",
                ignore_index: int = -100) -> float:
    """Tr(G) by brute force in float64: the Jacobian of every logit by torch.func.jacrev, then
    (1/n) Σ_t Tr(J_tᵀ H_t J_t) over the n counted predictions (classes last), H_t the loss's Hessian."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = model.double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,)).detach()
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no batched backward
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    jac = torch.cat([j.reshape(*out.shape, -1) for j in jac.values()], dim=-1)  # (N, ..., C, P)
    jjt = jac @ jac.transpose(-1, -2)  # (N, ..., C, C)
    if loss == "cross_entropy":
        p = out.softmax(-1)
        h = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        keep = y != ignore_index
        return float((h * jjt).sum((-1, -2))[keep].sum() / keep.sum())
    d = out.shape[-1]
    if loss == "mse":  # a prediction is an output vector: H = 2I/D
        return float((2 / d) * jjt.diagonal(dim1=-1, dim2=-2).sum() / (out.numel() // d))
    sig = out.sigmoid()  # bce: every element is a prediction, H = diag(σ(1 - σ))
    return float((sig * (1 - sig) * jjt.diagonal(dim1=-1, dim2=-2)).sum() / out.numel())


def test_help_lists_every_data_set_gmix_train_reads(capsys):
    with pytest.raises(SystemExit):
        main(["trace", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in DATASETS:
        assert name in text
    assert {"imagenet", "imagefolder", "multi30k"} <= set(DATASETS)


@pytest.mark.parametrize(
    ("data", "shape", "classes"),
    [("digits", (1, 8, 8), 10), ("mnist1d", (1, 40), 10), ("synthetic", (3, 32, 32), 10),
     ("cifar10", (3, 32, 32), 10), ("cifar100", (3, 32, 32), 100)],
)  # fmt: skip
def test_trace_reads_the_in_memory_data_sets(data, shape, classes, tmp_path, capsys):
    from large_data import write_cifar

    if data.startswith("cifar"):
        write_cifar(tmp_path, data, n_train=10)
    net = build_model("mlp", num_classes=classes, input_shape=shape, hidden=[4])
    torch.save(net.state_dict(), tmp_path / "mlp.pt")
    out = tmp_path / "r.json"
    code, _, err = _trace([str(tmp_path / "mlp.pt"), "--model", "mlp", "--model-kwargs", '{"hidden": [4]}',
                           "--input-shape", ",".join(map(str, shape)), "--data", data, "--data-dir", str(tmp_path),
                           "--samples", "6", "--seed", "5", "--method", "exact", "--json", str(out), "--no-progress"],
                          capsys)  # fmt: skip
    assert code == 0, err
    ds = load_dataset(data, "train", tmp_path).subset(6, torch.Generator().manual_seed(5))
    want = exact_ggn_trace(net, ds.tensors()).value  # unaugmented: the evaluation inputs
    assert json.loads(out.read_text())["results"][0]["value"] == pytest.approx(want, rel=1e-6)


def test_trace_reads_imagenet_and_any_imagefolder(tmp_path, capsys):
    """Regression: a torchvision ResNet state_dict on an ImageFolder ended in "'ImageFolderDataset' object has
    no attribute 'subset'"; now it is measured on a random subset, in eval transforms, at the model's size."""
    import torchvision

    root = write_imagefolder(tmp_path / "imagenet", per_class=(3, 1), size=(20, 28))
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")
    common = [str(tmp_path / "resnet18.pt"), "--model", "torchvision:resnet18", "--input-shape", "3,32,32",
              "--method", "exact", "--samples", "5", "--seed", "2", "--no-progress"]  # fmt: skip
    values = []
    for data, data_dir in (("imagenet", root), ("imagefolder", root), ("imagefolder", root / "train")):
        out = tmp_path / f"{data}-{len(values)}.json"
        code, _, err = _trace([*common, "--data", data, "--data-dir", str(data_dir), "--json", str(out)], capsys)
        assert code == 0, err
        report = json.loads(out.read_text())
        assert report["data"]["samples"] == report["data"]["n_predictions"] == 5
        values.append(report["results"][0]["value"])
    ds = load_imagenet("train", root, image_size=32).subset(5, torch.Generator().manual_seed(2))
    want = exact_ggn_trace(net, ds.tensors()).value
    assert values == pytest.approx([want] * 3, rel=1e-6)


@pytest.fixture(scope="module")
def fig3_run(tmp_path_factory):
    """A toy-size Fig. 3 Transformer trained two steps by ``gmix train --preset fig3_transformer`` on tiny
    Multi30k files, with ``--trace-every 2``."""
    root = write_multi30k(tmp_path_factory.mktemp("multi30k"))
    small = root / "small.json"
    small.write_text(json.dumps({"model_kwargs": {"d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16}}))
    out = root / "run"
    code = main(["train", "--preset", "fig3_transformer", "--config", str(small), "--data-dir", str(root), "--steps",
                 "2", "--batch-size", "4", "--trace-every", "2", "--trace-method", "fisher_is", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    return root, out


def test_train_fig3_transformer_with_trace_every(fig3_run):
    root, out = fig3_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    traces = [r for r in records if r["kind"] == "trace"]
    assert [r["step"] for r in traces] == [0, 2] and {r["ggn_method"] for r in traces} == {"fisher_is"}
    ds = load_multi30k("train", root)
    tokens = int((ds.tensors()[1] != PAD).sum())  # the trace subset is the whole 8-sentence training split
    for r in traces:
        assert r["n_samples"] == 8 and r["n_predictions"] == tokens
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ggn_trace", "empirical_fisher_trace", "loss"))


def test_trace_of_a_fig3_transformer_checkpoint_on_multi30k(fig3_run, tmp_path, capsys):
    root, out = fig3_run
    report_path = tmp_path / "fig3.json"
    code, stdout, err = _trace([str(out), "--method", "exact", "--samples", "5", "--seed", "1", "--json",
                                str(report_path), "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    ds = load_trace_data("multi30k", "train", root, samples=5, seed=1)
    x, y = ds.tensors()
    n = int((y != PAD).sum())
    assert report["data"]["ignore_index"] == PAD and report["data"]["n_predictions"] == n and n < y.numel()
    assert f"n={n} counted predictions" in stdout
    net, _ = load_checkpoint(out)
    want = dense_trace(net, x, y, ignore_index=PAD)
    assert report["results"][0]["value"] == pytest.approx(want, rel=1e-5)  # float32 estimator, float64 reference
    code, _, _ = _trace([str(out), "--method", "fisher_is", "--probes", "2", "--samples", "5", "--no-progress"],
                        capsys)  # fmt: skip
    assert code == 0


def test_trace_of_a_fig3_checkpoint_on_another_vocabulary_is_one_line(fig3_run, tmp_path, capsys):
    from large_data import SENTENCES

    bird = ("ein vogel fliegt hoch .", "a bird flies high .")
    other = write_multi30k(tmp_path, train=[*SENTENCES, bird, bird])  # two more words seen twice
    code, _, err = _trace([str(fig3_run[1]), "--data-dir", str(other), "--samples", "4", "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "vocabulary built from the training text" in err and "use the --data-dir it was trained on" in err


def test_evaluation_batches_too_large_to_keep_are_decoded_again_on_every_pass(tmp_path):
    root = write_imagefolder(tmp_path / "imagenet", per_class=(3, 1), size=(20, 28))
    ds = load_trace_data("imagenet", "train", root, samples=7, seed=4, image_size=16)
    kept, decoded = EvalBatches(ds, 3), EvalBatches(ds, 3, cache_bytes=0)
    assert kept._cache is not None and decoded._cache is None and len(decoded) == 3
    for (xa, ya), (xb, yb), y in zip(kept, decoded, decoded.labels(), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(y, yb)
    assert [len(y) for _, y in decoded] == [3, 3, 1]  # re-iterable: a second pass decodes again
    decoded.transform = lambda x, y: (x, y + 10)
    assert torch.equal(torch.cat(list(decoded.labels())), ds.y + 10)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_trace_with_mse_and_bce_on_one_hot_class_labels(loss, tmp_path, capsys):
    net = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[8])
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "r.json"
    code, stdout, err = _trace([str(tmp_path / "weights.pt"), "--model", "mlp", "--model-kwargs", '{"hidden": [8]}',
                                "--input-shape", "1,8,8", "--data", "digits", "--samples", "12", "--method", "exact",
                                "--loss", loss, "--json", str(out), "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["data"]["loss"] == loss and report["data"]["targets"] == "one-hot class labels"
    assert report["data"]["n_predictions"] == (12 if loss == "mse" else 120)
    x, y = load_trace_data("digits", "train", samples=12, seed=0).tensors()
    want = dense_trace(net, x.double(), torch.nn.functional.one_hot(y, 10).double(), loss)
    assert report["results"][0]["value"] == pytest.approx(want, rel=1e-5)


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
        ("unknown-loss", "invalid choice: 'hinge'"),
        ("unknown-data", "unknown data set 'mnist'"),
        ("imagenet-without-data-dir", "imagenet needs --data-dir"),
        ("labels-do-not-match-outputs", "labels of shape (2,) do not match outputs of shape (2, 3, 10)"),
        ("every-label-ignored", "every label is ignore_index"),
        ("non-finite-logits", "non-finite logits"),
        ("one-hot-targets-need-a-classifier", "--loss bce with class labels needs (batch, classes) outputs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, match, tmp_path, digits_checkpoint, capsys):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save(build_model("mlp", num_classes=10, input_shape=(1, 8, 8)).state_dict(), tmp_path / "mlp.pt")
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 30), nn.Unflatten(1, (3, 10)))  # (N, 3, 10): not (N, C)
    torch.save(seq, tmp_path / "seq.pt")
    nan = build_model("mlp", num_classes=10, input_shape=(1, 8, 8))
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    torch.save(nan.state_dict(), tmp_path / "nan.pt")
    (label,) = load_trace_data("digits", "train", samples=1, seed=0).y.tolist()
    mlp = ["--model", "mlp", "--data", "digits", "--input-shape", "1,8,8"]
    args = {
        "missing": [str(tmp_path / "nope.pt")],
        "not-a-checkpoint": [str(tmp_path / "junk.pt")],
        "other-architecture": [digits_checkpoint(), "--model", "resnet18"],
        "state-dict-of-another-architecture": [str(tmp_path / "mlp.pt"), "--model", "digits_cnn", "--data", "digits",
                                               "--input-shape", "1,8,8"],
        "labels-out-of-range": [digits_checkpoint(5)],
        "empty-data": [digits_checkpoint(), "--samples", "0"],
        "bad-method": [digits_checkpoint(), "--method", "lanczos"],
        "unknown-loss": [digits_checkpoint(), "--loss", "hinge"],
        "unknown-data": [digits_checkpoint(), "--data", "mnist"],
        "imagenet-without-data-dir": [digits_checkpoint(), "--data", "imagenet"],
        "labels-do-not-match-outputs": [str(tmp_path / "seq.pt"), "--trust-checkpoint", "--data", "digits"],
        "every-label-ignored": [digits_checkpoint(), "--samples", "1", "--ignore-index", str(label)],
        "non-finite-logits": [str(tmp_path / "nan.pt"), *mlp],
        "one-hot-targets-need-a-classifier": [str(tmp_path / "seq.pt"), "--trust-checkpoint", "--data", "digits",
                                            "--loss", "bce"],
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
