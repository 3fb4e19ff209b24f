"""The training engine: accumulation, exact resume, NaN stop, checkpoints, large logical batches."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from gmix_curvature.checkpoint import load_checkpoint
from gmix_curvature.data import ArrayDataset
from gmix_curvature.errors import CheckpointError, GmixError, TrainingDiverged
from gmix_curvature.mixing import per_sample_gradients_loop
from gmix_curvature.noise import sample_weights
from gmix_curvature.train import EpochSampler, TrainConfig, resolve_config, train


def _toy(n=48, d=10, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return ArrayDataset("toy", x, y, classes)


def _mlp_config(**kw):
    base = dict(
        model="mlp",
        model_kwargs={"hidden": [8]},
        data="toy",
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        lr=0.5,
        schedule="constant",
        batch_size=24,
        steps=1,
        dtype="float64",
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("noise", ["none", "gaussian", "rademacher"])
def test_one_step_equals_reference_update(noise):
    """θ₁ = θ₀ − η Σ_b π_b ∇ℓ_b with the per-sample loop as reference and the documented mixing seed."""
    ds = _toy()
    cfg = _mlp_config(noise=noise, kappa_ratio=1.0 if noise != "none" else None, seed=3)
    result = train(cfg, datasets=(ds, ds))
    torch.manual_seed(cfg.seed)  # the engine initialises under the run's seed
    from gmix_curvature.checkpoint import model_from_config

    model = model_from_config({"model": "mlp", "model_kwargs": {"hidden": [8]}, "num_classes": 3,
                               "input_shape": [10]}).double()
    theta0 = _params(model)
    idx = EpochSampler(len(ds), cfg.seed).batch(0, cfg.batch_size)
    x, y = ds.get_batch(idx)
    grads = per_sample_gradients_loop(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    pi = sample_weights(noise, 24, 1.0 / 24, torch.Generator().manual_seed(2 * cfg.seed + 1), dtype=torch.float64)
    expected = theta0 - cfg.lr * (pi @ grads)
    assert torch.allclose(_params(result.model), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("micro", [12, 8, 1])
@pytest.mark.parametrize("noise", ["none", "gaussian"])
def test_accumulation_equals_one_batch(micro, noise):
    ds = _toy()
    common = dict(noise=noise, kappa_ratio=2.0 if noise != "none" else None, steps=3, momentum=0.9)
    one = train(_mlp_config(micro_batch_size=24, **common), datasets=(ds, ds))
    acc = train(_mlp_config(micro_batch_size=micro, **common), datasets=(ds, ds))
    assert torch.allclose(_params(one.model), _params(acc.model), rtol=0, atol=1e-13)


def test_device_mixing_single_process_matches_group_formula():
    ds = _toy()
    cfg = _mlp_config(mixing="device", groups=4, noise="gaussian", kappa_ratio=1.0, seed=5)
    result = train(cfg, datasets=(ds, ds))
    from gmix_curvature.checkpoint import model_from_config

    torch.manual_seed(cfg.seed)
    model = model_from_config({"model": "mlp", "model_kwargs": {"hidden": [8]}, "num_classes": 3,
                               "input_shape": [10]}).double()
    theta0 = _params(model)
    idx = EpochSampler(len(ds), cfg.seed).batch(0, 24)
    grads = per_sample_gradients_loop(model, nn.CrossEntropyLoss(reduction="none"), *ds.get_batch(idx))
    pi = sample_weights("gaussian", 4, 0.25, torch.Generator().manual_seed(11), dtype=torch.float64)
    g = sum(pi[k] * grads[6 * k : 6 * k + 6].mean(0) for k in range(4))
    assert torch.allclose(_params(result.model), theta0 - cfg.lr * g, rtol=0, atol=1e-13)


def test_paper_sized_logical_batch_8192():
    """A logical batch of 8,192 (Table 1's) in micro-batches of 1,024 on CIFAR-shaped data."""
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [16]}, data="synthetic", batch_size=8192,
                      micro_batch_size=1024, steps=2, noise="rademacher", kappa_ratio=2.0, progress=False,
                      lr=0.1, lr_scaling="linear", schedule="constant", device="cpu")
    records = []
    result = train(cfg, callback=lambda step, m: records.append(m))
    assert result.config.kappa == pytest.approx(2.0 / 8192)
    assert result.steps == 2 and len(records) == 2
    assert torch.isfinite(_params(result.model)).all()


def test_resume_is_bitwise_exact(tmp_path):
    cfg = TrainConfig(model="digits_cnn", model_kwargs={"width": 4}, batch_size=128, micro_batch_size=64, steps=6,
                      noise="gaussian", kappa_ratio=2.0, eval_every=1, checkpoint_every=1, progress=False,
                      device="cpu", warmup_steps=2)
    straight = train(dataclasses.replace(cfg, out=str(tmp_path / "a")))

    class Kill(Exception):
        pass

    def kill_at_4(step, _):
        if step == 4:
            raise Kill

    out_b = tmp_path / "b"
    with pytest.raises(Kill):
        train(dataclasses.replace(cfg, out=str(out_b)), callback=kill_at_4)
    resumed = train(dataclasses.replace(cfg, out=str(out_b)), resume=True)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    steps = [json.loads(line)["step"] for line in (out_b / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    a_lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in a_lines if '"step"' in x and json.loads(x)["kind"] == "step"] == [
        json.loads(x)["loss"] for x in (out_b / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "step"
    ]


def test_resume_refuses_a_changed_configuration(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=256, progress=False, out=str(tmp_path), device="cpu")
    train(cfg)
    with pytest.raises(GmixError, match="differs from the checkpoint's: lr"):
        train(dataclasses.replace(cfg, lr=0.5), resume=True)


class _PoisonedData(ArrayDataset):
    """Returns a NaN input on the third training batch."""

    calls = 0

    def get_batch(self, indices, generator=None, *, train=False):
        x, y = super().get_batch(indices, generator, train=train)
        if train:
            type(self).calls += 1
            if type(self).calls == 3:
                x = x.clone()
                x[0] = float("nan")
        return x, y


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    base = _toy(dtype=torch.float32)
    ds = _PoisonedData(base.name, base.x, base.y, base.num_classes)
    cfg = _mlp_config(steps=5, dtype="float32", out=str(tmp_path), checkpoint_every=1, eval_every=1)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 3; the checkpoint of step 2"):
        train(cfg, datasets=(ds, base))
    _, config = load_checkpoint(tmp_path / "checkpoint.pt")
    assert config["model"] == "mlp"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=2, batch_size=256, progress=False, out=str(tmp_path), device="cpu", checkpoint_every=1)
    train(cfg)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    from gmix_curvature.checkpoint import save_checkpoint

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"x": 1}, tmp_path / "checkpoint.pt")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    cfg = TrainConfig(steps=2, batch_size=256, progress=False, out=str(tmp_path), device="cpu")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        train(cfg, resume=True)


class _Decoding:
    """A data set whose training batches draw from the generator (like decoding with augmentation) and that
    records the threads it ran on."""

    def __init__(self, base, prefetch):
        self.base, self.prefetch, self.threads = base, prefetch, set()
        self.num_classes, self.input_shape, self.name = base.num_classes, base.input_shape, "decoding"

    def __len__(self):
        return len(self.base)

    def get_batch(self, idx, generator=None, *, train=False):
        import threading

        self.threads.add(threading.get_ident())
        x, y = self.base.get_batch(idx)
        if train:
            x = x + 0.1 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x, y


def test_prefetched_micro_batches_give_the_same_run():
    import threading

    runs = {}
    for prefetch in (False, True):
        ds = _Decoding(_toy(), prefetch)
        cfg = _mlp_config(batch_size=24, micro_batch_size=5, steps=3, noise="gaussian", kappa_ratio=1.0)
        runs[prefetch] = (_params(train(cfg, datasets=(ds, _toy(12, seed=1))).model), ds.threads)
    assert torch.equal(runs[False][0], runs[True][0])
    assert runs[False][1] == {threading.get_ident()} and runs[True][1] - {threading.get_ident()}


def test_train_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    train(TrainConfig(steps=1, batch_size=64, progress=False, device="cpu", noise="gaussian", kappa=0.01))
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_same_run_different_seed_different_run():
    cfg = TrainConfig(steps=2, batch_size=128, progress=False, device="cpu", noise="rademacher", kappa_ratio=1.0)
    a, b = train(cfg), train(cfg)
    c = train(dataclasses.replace(cfg, seed=1))
    assert torch.equal(_params(a.model), _params(b.model))
    assert not torch.equal(_params(a.model), _params(c.model))


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(noise="gaussian"), "noise 'gaussian' needs kappa or kappa_ratio"),
        (dict(mixing="device", groups=5), "batch_size=64 is not divisible into groups=5"),
        (dict(mixing="ring"), "unknown mixing 'ring'; valid: sample, device"),
        (dict(steps=None), "give the run's length: steps or epochs"),
        (dict(noise="dirichlet", kappa_ratio=20.0), "dirichlet weights cannot reach"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
    ],
)
def test_bad_configuration(changes, match):
    cfg = dataclasses.replace(TrainConfig(steps=1, batch_size=64), **changes)
    with pytest.raises(ValueError, match=match):
        resolve_config(cfg, 100)


def test_unknown_config_key():
    with pytest.raises(GmixError, match="unknown configuration keys: colour"):
        TrainConfig.from_dict({"colour": "blue"})


def test_curvature_along_training_survives_a_kill_and_resume(tmp_path):
    """Issue 10: --trace-every records Tr(G) on a fixed training subset; a killed and resumed run writes
    the same records, each once."""
    cfg = TrainConfig(model="digits_cnn", model_kwargs={"width": 4}, batch_size=128, steps=4, eval_every=1,
                      checkpoint_every=1, progress=False, device="cpu", trace_every=2, trace_samples=64,
                      noise="gaussian", kappa_ratio=1.0)
    train(dataclasses.replace(cfg, out=str(tmp_path / "a")))

    def kill_at_3(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, out=str(tmp_path / "b")), callback=kill_at_3)
    train(dataclasses.replace(cfg, out=str(tmp_path / "b")), resume=True)

    def traces(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if json.loads(x)["kind"] == "trace"]

    a, b = traces("a"), traces("b")
    assert [r["step"] for r in a] == [0, 2, 4] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["ggn_trace"] == rb["ggn_trace"] > 0
        assert ra["empirical_fisher_trace"] == rb["empirical_fisher_trace"]
