"""``gmix train``: a thin layer over :func:`gmix_curvature.train.train`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from gmix_curvature.data import DATASETS
from gmix_curvature.errors import GmixError
from gmix_curvature.models import MODELS

HELP = "train a model with GradientMix (or the averaging baseline) and save metrics and checkpoints"

S = argparse.SUPPRESS


def _pair(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers separated by a comma, got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers separated by a comma, got {text!r}") from None

# (flag, TrainConfig field, type, help); every default comes from the preset, then from TrainConfig.
_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "architecture: " + ", ".join(MODELS) + " or torchvision:NAME"),
    ("--data", "data", str, "data set: " + ", ".join(DATASETS) + " (digits embedded, mnist1d generated)"),
    ("--data-dir", "data_dir", str, "directory of the data set's files (CIFAR pickles, ImageFolder trees, Multi30k)"),
    ("--noise", "noise", str, "mixing weights (Eq. 12): none (plain averaging), gaussian, rademacher, dirichlet"),
    ("--kappa", "kappa", float, "κ, the standard deviation of each mixing weight π_b"),
    ("--kappa-ratio", "kappa_ratio", float, "r = κ·N relative to the mean weight 1/N (γ̄ = 1 + r²); instead of --kappa"),
    ("--mixing", "mixing", str, "sample (Eq. 4, per-sample weights) or device (Eq. 3, weights per group)"),
    ("--groups", "groups", int, "K, the number of virtual devices for --mixing device"),
    ("--optimizer", "optimizer", str, "sgd, nesterov, adam, adamw, lars, lamb"),
    ("--lr", "lr", float, "peak learning rate (per --base-batch samples with --lr-scaling linear)"),
    ("--lr-scaling", "lr_scaling", str, "none, or linear: lr × batch_size / base_batch (Goyal et al. 2017)"),
    ("--base-batch", "base_batch", int, "the batch size --lr refers to under linear scaling (paper: 200)"),
    ("--momentum", "momentum", float, "momentum μ (SGD, Nesterov, LARS)"),
    ("--weight-decay", "weight_decay", float, "weight decay (not applied to biases and normalisation parameters)"),
    ("--schedule", "schedule", str, "learning-rate schedule: constant, cosine, poly (Eq. 15), rsqrt (Transformer)"),
    ("--lr-init", "lr_init", float, "η_init of Eq. 15 (poly schedule)"),
    ("--lr-final", "lr_final", float, "η_final of Eq. 15 / the cosine schedule's final rate"),
    ("--p-warmup", "p_warmup", float, "p_warmup of Eq. 15"),
    ("--p-decay", "p_decay", float, "p_decay of Eq. 15"),
    ("--trust-coefficient", "trust_coefficient", float, "LARS/LAMB trust coefficient (paper: 1e-3)"),
    ("--betas", "betas", _pair, "Adam/LAMB β₁,β₂, e.g. 0.9,0.999"),
    ("--eps", "eps", float, "Adam/LAMB ε"),
    ("--bn-gamma0", "bn_gamma0", float, "γ₀, initial scale of the final BatchNorm of each residual block"),
    ("--bn-momentum", "bn_momentum", float, "BatchNorm momentum in torch's convention (TF's 0.9 is 0.1 here)"),
    ("--bn-eps", "bn_eps", float, "BatchNorm ε"),
    ("--warmup-epochs", "warmup_epochs", float, "warmup length in epochs"),
    ("--warmup-steps", "warmup_steps", int, "warmup length in optimizer steps (instead of --warmup-epochs)"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the cross-entropy"),
    ("--batch-size", "batch_size", int, "logical batch size B (one optimizer step, one draw of π)"),
    ("--micro-batch-size", "micro_batch_size", int, "micro-batch size b for gradient accumulation (B/b passes)"),
    ("--steps", "steps", int, "length of the run in optimizer steps"),
    ("--epochs", "epochs", float, "length of the run in epochs (instead of --steps)"),
    ("--seed", "seed", int, "seed of initialisation, data order, augmentation and mixing weights"),
    ("--eval-every", "eval_every", int, "evaluate every N steps (default: once per epoch)"),
    ("--checkpoint-every", "checkpoint_every", int, "write the checkpoint every N steps (default: --eval-every)"),
    ("--dtype", "dtype", str, "float32 or float64"),
    ("--device", "device", str, "auto, cpu or cuda"),
    ("--trace-every", "trace_every", int, "record Tr(G), empirical-Fisher trace and λ_max every N steps (0: off)"),
    ("--trace-method", "trace_method", str, "Tr(G) method for --trace-every (default auto: exact up to 16 classes)"),
    ("--trace-samples", "trace_samples", int, "size of the fixed training subset for --trace-every"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=S, help="start from a preset (see --list-presets); flags override it")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--config", default=S, metavar="JSON", help="start from a saved config.json (redo a run)")
    for flag, dest, typ, text in _OPTIONS:
        p.add_argument(flag, dest=dest, type=typ, default=S, help=text)
    p.add_argument("--out", default=S, help="output directory (metrics.jsonl, config.json, checkpoint.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, exactly")
    p.add_argument("--trust-checkpoint", dest="trust", action="store_true",
                   help="with --resume: unpickle a checkpoint that needs it in full, which runs code it names "
                   "(only for files from a source you trust; gmix's own checkpoints never need it)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> tuple[Any, bool]:
    """The TrainConfig the arguments describe: preset, then --config, then explicit flags."""
    from gmix_curvature.presets import get_preset
    from gmix_curvature.train import TrainConfig

    values: dict[str, Any] = get_preset(args.preset) if hasattr(args, "preset") else {}
    if hasattr(args, "config"):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            values.update(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise GmixError(f"{path} is not JSON: {exc}") from None
    for _, dest, _, _ in _OPTIONS:
        if hasattr(args, dest):
            values[dest] = getattr(args, dest)
    for dest in ("out", "progress"):
        if hasattr(args, dest):
            values[dest] = getattr(args, dest)
    if args.resume and values.get("out") and not hasattr(args, "preset") and not hasattr(args, "config"):
        saved = Path(values["out"]) / "config.json"
        if saved.is_file():  # resume from the saved configuration; flags given must agree with it
            base = json.loads(saved.read_text())
            base.update({k: v for k, v in values.items()})
            values = base
    if "steps" in values and "epochs" in values and values["steps"] is not None and values["epochs"] is not None:
        given = [d for d in ("steps", "epochs") if hasattr(args, d)]
        if len(given) == 2:
            raise GmixError("give --steps or --epochs, not both")
        values["epochs" if "steps" in given else "steps"] = None
    return TrainConfig.from_dict(values), bool(args.resume)


def run(args: argparse.Namespace) -> int:
    from gmix_curvature.presets import PRESETS
    from gmix_curvature.train import train

    if args.list_presets:
        for name, text in PRESETS.items():
            print(f"{name:24s} {text}")
        return 0
    config, resume = config_from_args(args)
    result = train(config, resume=resume, trust=args.trust)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    print(result.summary())
    if result.out is not None:
        print(f"outputs in {result.out}")
    return 0
