"""Every preset builds its model, optimizer and schedule and takes two steps on tiny data in its real format.

The data are written to disk in the formats the presets read (CIFAR python pickles, an ImageFolder tree
of JPEGs, Multi30k text files) and loaded by the real loaders; only the sizes shrink (batch 4, 32×32
images for ResNet-50, two steps, and the models' widths — the same architectures, block types and
parameter groups, a fraction of the arithmetic). Table 3's numbers are checked against the paper.
"""

from __future__ import annotations

import pytest
import torch
from large_data import write_cifar, write_imagefolder, write_multi30k

from gmix_curvature.data import load_dataset
from gmix_curvature.data_large import load_imagenet, load_multi30k
from gmix_curvature.optim import LARS, final_bn_layers, peak_lr, polynomial_lr
from gmix_curvature.presets import get_preset, preset_names
from gmix_curvature.sweep import grid_cells, preset_grid
from gmix_curvature.train import TrainConfig, train

PAPER_PRESETS = [n for n in preset_names() if n.startswith(("table", "fig"))]
NARROW = {  # same architecture, narrower: the test's time goes to convolutions and 44M-parameter Adam states
    "resnet50": {"width_per_group": 4},
    "resnet18": {"width": 8},
    "transformer": {"d_model": 32, "nhead": 4, "num_layers": 2, "dim_feedforward": 64},
}
TINY = {"batch_size": 4, "steps": 2, "epochs": None, "warmup_steps": 1, "eval_every": 2, "progress": False}


def test_all_paper_presets_exist():
    assert set(PAPER_PRESETS) == {
        "table3_nesterov", "table3_lars", "table2_adam", "table2_lamb",
        "fig1_sgd_lars", "fig1_adam_lamb", "fig2_sgd_lars", "fig2_adam_lamb", "fig3_transformer",
    }  # fmt: skip


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_preset_and_grid_are_valid_configs(name):
    preset, grid = preset_grid(name)
    TrainConfig.from_dict(preset)  # unknown keys raise
    for cell in grid_cells(grid):
        TrainConfig.from_dict({**preset, **cell.overrides})


# (column of Table 3, preset): the table's numbers, BN momentum in torch's convention (1 − 0.9)
TABLE3 = {
    "table3_nesterov": dict(steps=2512, warmup_steps=706, p_warmup=2.0, p_decay=2.0, lr=7.05, lr_final=6e-6,
                            momentum=0.97603, weight_decay=5.8e-5, label_smoothing=0.15, bn_gamma0=0.4138),
    "table3_lars": dict(steps=2512, warmup_steps=706, p_warmup=1.0, p_decay=2.0, lr=29.0, lr_final=1e-4,
                        momentum=0.929, weight_decay=1e-4, label_smoothing=0.1, bn_gamma0=0.0, trust_coefficient=1e-3),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TABLE3))
def test_table3_numbers(name):
    p = get_preset(name)
    assert {k: p[k] for k in TABLE3[name]} == TABLE3[name]
    assert (p["batch_size"], p["bn_momentum"], p["bn_eps"], p["lr_scaling"], p["schedule"]) == (
        32768, 0.1, 1e-5, "none", "poly",
    )


def test_section_5_settings():
    for name in ("table2_adam", "table2_lamb"):
        p = get_preset(name)
        assert (p["betas"], p["eps"], p["epochs"], p["warmup_epochs"], p["batch_size"]) == (
            (0.9, 0.999), 1e-6, 90, 20, 32768,
        )
    for fig in ("fig1", "fig2"):
        for opts, lr in ((("sgd", "lars"), 0.1), (("adam", "lamb"), 1e-3)):
            p, grid = preset_grid(f"{fig}_{opts[0]}_{opts[1]}")
            assert (p["lr"], p["base_batch"], p["lr_scaling"], p["epochs"], p["warmup_epochs"]) == (
                lr, 200, "linear", 200, 20,
            )
            assert grid["optimizer"] == list(opts) and grid["batch_size"] == [200, 500, 1000, 2000, 5000]
            assert p["data"] == {"fig1": "cifar10", "fig2": "cifar100"}[fig]
    _, grid = preset_grid("fig3_transformer")
    assert [c["warmup_steps"] * c["batch_size"] for c in grid["batch_size"]] == [4000 * 64] * 5


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    write_imagefolder(root / "imagenet", per_class=(2, 1))
    write_multi30k(root)
    return root


def _datasets(data: str, root):
    if data in ("cifar10", "cifar100"):
        return load_dataset(data, "train", root), load_dataset(data, "test", root)
    if data == "imagenet":
        return tuple(load_imagenet(split, root / "imagenet", image_size=32) for split in ("train", "val"))
    return load_multi30k("train", root), load_multi30k("val", root)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_preset_takes_two_steps(name, tiny_data, monkeypatch):
    preset = get_preset(name)
    # no out directory: the test is about the preset, not about checkpoints
    config = TrainConfig.from_dict({**preset, **TINY, "model_kwargs": NARROW[preset["model"]]})
    datasets = _datasets(preset["data"], tiny_data)
    seen = {}

    import gmix_curvature.train as engine

    real = engine.optimizer_from_config

    def spy(model, cfg):
        seen["gammas"] = [bn.weight.detach().clone() for bn in final_bn_layers(model)]
        opt = seen["optimizer"] = real(model, cfg)
        seen["lrs"] = []
        opt.register_step_pre_hook(lambda o, args, kwargs: seen["lrs"].append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(engine, "optimizer_from_config", spy)
    metrics = {}
    result = train(config, datasets=datasets, callback=lambda step, final: metrics.update(final))
    assert result.steps == 2 and len(seen["lrs"]) == 2
    assert "test_acc" in metrics  # the paper's peak LRs on 12 images may well blow up the eval loss
    opt = seen["optimizer"]
    expected = {"nesterov": "SGD", "sgd": "SGD", "adam": "Adam", "lars": "LARS", "lamb": "Lamb"}[preset["optimizer"]]
    assert type(opt).__name__ == expected
    if isinstance(opt, LARS):
        assert opt.param_groups[0]["trust_coefficient"] == preset["trust_coefficient"]
    if preset.get("bn_gamma0") is not None:
        assert seen["gammas"] and all(torch.all(g == preset["bn_gamma0"]) for g in seen["gammas"])
    if preset["schedule"] == "poly":
        resolved = result.config
        want = [polynomial_lr(t, total_steps=2, warmup_steps=1, lr_init=resolved.lr_init, lr_peak=peak_lr(resolved),
                              lr_final=resolved.lr_final, p_warmup=resolved.p_warmup, p_decay=resolved.p_decay)
                for t in range(2)]  # fmt: skip
        assert seen["lrs"] == pytest.approx(want, rel=1e-12)
