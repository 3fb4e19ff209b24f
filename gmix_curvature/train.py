"""The training engine: one loop for any optimizer, with GradientMix at the paper's logical batch sizes.

One logical step of batch B (Algorithm 1):

1. the next B indices of an endless stream of epoch permutations (epoch e shuffled by a generator
   seeded from ``(seed, e)``, so the order is a pure function of the step);
2. one draw of the mixing weights π for the whole logical batch — over the B samples (Eq. 4,
   ``mixing="sample"``) or over K groups (Eq. 3, ``mixing="device"``) — from the mixing generator;
   ``noise="none"`` gives π_b = 1/B, the averaging baseline, through the same code;
3. the batch in micro-batches of ``micro_batch_size``; each back-propagates Σ_{b ∈ micro} π_b ℓ_b and the
   gradients accumulate, so the step's gradient is exactly Σ_b π_b ∇ℓ_b of the whole logical batch
   (BatchNorm in train mode aside: its statistics are those of each micro-batch);
4. the optimizer step at the learning rate of the schedule, a pure function of the optimizer step.

Per step the engine records the mean loss, the mixed loss, the learning rate, γ_t = B·Σπ_b² (for device
mixing K·Σπ_k²) and the gradient norm; every ``eval_every`` steps train/test loss and accuracy — all as
JSON lines in ``OUT/metrics.jsonl``. ``OUT/checkpoint.pt`` holds the model, optimizer, scheduler, step,
every generator's state and the resolved configuration (``OUT/config.json`` too); it is written
atomically, and ``resume=True`` continues bit for bit. A non-finite loss raises
:class:`~gmix_curvature.errors.TrainingDiverged` and leaves the last good checkpoint in place.

Preemption (:mod:`gmix_curvature.preemption`): SIGTERM, SIGINT and SIGUSR1 during :func:`train` finish the current
step, write its checkpoint and raise :class:`~gmix_curvature.errors.TrainingInterrupted`; under torchrun the ranks
agree on the step (a MAX all-reduce of the stop flag after every step), rank 0 writes. The checkpoint also holds
the training statistics since the last evaluation, so a run stopped between evaluations resumes exactly. One
writer (:mod:`gmix_curvature.lock`): rank 0 holds ``OUT/.lock`` for the whole run. A failed checkpoint or metrics
write raises :class:`~gmix_curvature.errors.RunWriteError` on every rank at the same step, the previous checkpoint
intact; a checkpoint is never written past metrics that could not be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmix_curvature import noise as noise_mod
from gmix_curvature.checkpoint import FORMAT, model_from_config, read_checkpoint, save_checkpoint
from gmix_curvature.data import load_dataset
from gmix_curvature.distributed import DistContext, MixingHookState, init_distributed, mixing_comm_hook
from gmix_curvature.errors import (
    CheckpointError,
    GmixError,
    RunWriteError,
    TrainingDiverged,
    TrainingInterrupted,
)
from gmix_curvature.lock import run_lock
from gmix_curvature.mixing import expand_group_weights
from gmix_curvature.optim import optimizer_from_config, schedule_from_config
from gmix_curvature.preemption import StopRequest, stop_on_signals

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "resolve_config",
    "evaluate",
    "EpochSampler",
    "Recorder",
    "micro_batches",
]


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved beside its outputs, so the run can be redone from it.

    ``kappa`` is κ, the standard deviation of each mixing weight; ``kappa_ratio`` is r = κ·N with N the
    number of weights mixed (B for sample-wise, ``groups`` for device-wise), so that γ̄ = 1 + r².
    ``lr`` is the peak learning rate, or the rate per ``base_batch`` samples when ``lr_scaling="linear"``.
    """

    # model and data
    model: str = "digits_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    # GradientMix
    noise: str = "none"
    kappa: float | None = None
    kappa_ratio: float | None = None
    mixing: str = "sample"
    groups: int = 8
    # optimizer and schedule
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_scaling: str = "none"
    base_batch: int = 200
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    trust_coefficient: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_epochs: float = 0.0
    lr_init: float = 0.0
    lr_final: float = 0.0
    p_warmup: float = 1.0
    p_decay: float = 2.0
    label_smoothing: float = 0.0
    bn_gamma0: float | None = None
    bn_momentum: float | None = None
    bn_eps: float | None = None
    # batch and length
    batch_size: int = 512
    micro_batch_size: int | None = None
    steps: int | None = None
    epochs: float | None = None
    # run
    seed: int = 0
    out: str | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    progress: bool = True
    # curvature along training (Issue 10); 0 = off
    trace_every: int = 0
    trace_method: str = "auto"
    trace_samples: int = 256

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a saved ``config.json``); an unknown key raises ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise GmixError(f"unknown configuration keys: {', '.join(unknown)}")
        values = dict(values)
        if "betas" in values and values["betas"] is not None:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


@dataclass
class TrainResult:
    """What a run produced: the trained model (eval mode), final metrics, and where the outputs are."""

    model: nn.Module
    config: TrainConfig
    steps: int
    final: dict[str, float]
    seconds: float
    out: Path | None

    def summary(self) -> str:
        f = self.final
        return (
            f"steps={self.steps} train_loss={f.get('train_loss', float('nan')):.4f} "
            f"test_loss={f.get('test_loss', float('nan')):.4f} test_acc={100 * f.get('test_acc', float('nan')):.2f}%"
        )


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise GmixError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def resolve_config(config: TrainConfig, num_train: int) -> TrainConfig:
    """Fill in what follows from the data: total steps, warmup steps, κ from its ratio, eval cadence.

    Validates every field; raises ValueError naming the problem.

    >>> c = resolve_config(TrainConfig(epochs=2, batch_size=100, noise="gaussian", kappa_ratio=2.0), 1000)
    >>> c.steps, c.kappa
    (20, 0.02)
    """
    c = dataclasses.replace(config)
    noise_mod.NoiseKind.parse(c.noise)
    _check_choice("mixing", c.mixing, ("sample", "device"))
    _check_choice("dtype", c.dtype, ("float32", "float64"))
    if not isinstance(c.batch_size, int) or c.batch_size < 1:
        raise GmixError(f"batch_size must be an integer >= 1, got {c.batch_size!r}")
    if c.micro_batch_size is None:
        c.micro_batch_size = c.batch_size
    if c.micro_batch_size < 1:
        raise GmixError(f"micro_batch_size must be >= 1, got {c.micro_batch_size}")
    if c.mixing == "device":
        if c.groups < 1 or c.batch_size % c.groups:
            raise GmixError(f"batch_size={c.batch_size} is not divisible into groups={c.groups} equal groups")
    if num_train < 1:
        raise GmixError("the training split is empty")
    if (c.steps is None) == (c.epochs is None):
        if c.steps is None:
            raise GmixError("give the run's length: steps or epochs")
        c.epochs = None  # steps win when both come from a preset and a flag
    if c.steps is None:
        if c.epochs <= 0:
            raise GmixError(f"epochs must be > 0, got {c.epochs}")
        c.steps = max(1, math.ceil(c.epochs * num_train / c.batch_size))
    if c.steps < 1:
        raise GmixError(f"steps must be >= 1, got {c.steps}")
    if c.warmup_steps is None:
        c.warmup_steps = int(round(c.warmup_epochs * num_train / c.batch_size))
    c.warmup_steps = min(max(0, int(c.warmup_steps)), c.steps)
    n_mixed = c.groups if c.mixing == "device" else c.batch_size
    if c.noise == "none":
        c.kappa, c.kappa_ratio = 0.0, 0.0
    else:
        if c.kappa is None and c.kappa_ratio is None:
            raise GmixError(f"noise {c.noise!r} needs kappa or kappa_ratio")
        if c.kappa is not None and c.kappa_ratio is not None and not math.isclose(c.kappa * n_mixed, c.kappa_ratio):
            raise GmixError("give kappa or kappa_ratio, not both")
        if c.kappa is None:
            c.kappa = noise_mod.kappa_from_ratio(c.kappa_ratio, n_mixed)
        if c.kappa < 0:
            raise GmixError(f"kappa must be >= 0, got {c.kappa}")
        c.kappa_ratio = c.kappa * n_mixed
        if c.kappa >= noise_mod.max_kappa(c.noise, n_mixed):
            noise_mod.sample_weights(c.noise, n_mixed, c.kappa)  # raises with the bound in the message
    if c.lr <= 0:
        raise GmixError(f"lr must be > 0, got {c.lr}")
    if c.eval_every is None:
        c.eval_every = max(1, math.ceil(num_train / c.batch_size))
    if c.checkpoint_every is None:
        c.checkpoint_every = c.eval_every
    if c.eval_every < 1 or c.checkpoint_every < 1:
        raise GmixError("eval_every and checkpoint_every must be >= 1")
    if c.trace_every < 0:
        raise GmixError(f"trace_every must be >= 0, got {c.trace_every}")
    return c


class EpochSampler:
    """The endless stream of epoch permutations: position p holds perm_{p // n}[p % n], each epoch's
    permutation drawn from a generator seeded with ``(seed, epoch)``; the batch of a step is a pure
    function of the step.

    >>> s = EpochSampler(5, seed=0)
    >>> sorted(s.batch(0, 5).tolist())
    [0, 1, 2, 3, 4]
    >>> s.batch(1, 3).tolist() == torch.cat([s.perm(0), s.perm(1)])[3:6].tolist()
    True
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7)
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        start = step * batch_size
        first, last = start // self.n, (start + batch_size - 1) // self.n
        stream = torch.cat([self.perm(e) for e in range(first, last + 1)])
        offset = start - first * self.n
        return stream[offset : offset + batch_size]


class Recorder:
    """Appends JSON records to ``metrics.jsonl`` (rank 0 only); on resume keeps those up to the checkpoint.

    A failed write (disk full, permissions) does not raise here: the first error is kept in ``error`` and nothing
    more is written, so that the training loop can stop every rank at the same step boundary.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.error: OSError | None = None

    def truncate_after(self, step: int) -> None:
        """Keep the records of steps ``<= step``, in order; a line cut short by a kill (a torn tail) is dropped.
        The file is replaced atomically, so a kill during the repair loses nothing."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                kept.append(line)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(k + "\n" for k in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None or self.error is not None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            self.error = exc

    def sync(self) -> None:
        """Flush the records to disk (before a checkpoint: the metrics never lag behind it)."""
        if self.path is None or self.error is not None or not self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc


def per_sample_losses(
    model: nn.Module, dataset: Any, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses (B,) and the number of correct predictions; cross-entropy unless the data set
    defines its own ``per_sample_losses``/``correct`` (sequence tasks)."""
    out = model(x)
    if hasattr(dataset, "per_sample_losses"):
        losses = dataset.per_sample_losses(out, y, label_smoothing)
        correct = dataset.correct(out, y)
    else:
        losses = F.cross_entropy(out, y, reduction="none", label_smoothing=label_smoothing)
        correct = (out.argmax(1) == y).sum()
    return losses, correct


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` in eval mode over ``dataset`` (sharded over ranks under DDP).

    >>> from gmix_curvature.models import build_model
    >>> ds = load_dataset("digits", "test")
    >>> r = evaluate(build_model("digits_cnn", num_classes=10, input_shape=(1, 8, 8)), ds)
    >>> sorted(r)
    ['acc', 'loss', 'n']
    """
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    n = len(dataset)
    idx = torch.arange(ctx.rank, n, ctx.world_size)
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for chunk in idx.split(batch_size):
        x, y = dataset.get_batch(chunk)
        x, y = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype), y.to(device)
        losses, corr = per_sample_losses(model, dataset, x, y)
        loss_sum += float(losses.sum())
        correct += float(corr)
        count += float(dataset.count(y)) if hasattr(dataset, "count") else len(chunk)
    loss_sum, correct, count, total = ctx.all_reduce_sum([loss_sum, correct, count, float(len(idx))])
    model.train(was_training)
    return {"loss": loss_sum / max(total, 1.0), "acc": correct / max(count, 1.0), "n": total}


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, g in generators.items():
        state[f"gen_{name}"] = g.get_state()
    return state


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state[f"gen_{name}"])


def micro_batches(
    dataset: Any, indices: torch.Tensor, chunks: tuple[torch.Tensor, ...], generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training micro-batches ``dataset.get_batch(indices[chunk], generator, train=True)`` of one step, in
    order. A data set that decodes from disk (``prefetch = True``, e.g. ImageNet) gets the next micro-batch
    decoded by a background thread while the current one computes; the calls still run one at a time and in
    order, so the generator's draws, and the batches, are those of the plain loop.

    >>> from gmix_curvature.data import load_dataset
    >>> ds = load_dataset("digits", "train")
    >>> [x.shape[0] for x, _ in micro_batches(ds, torch.arange(10), torch.arange(10).split(4), torch.Generator())]
    [4, 4, 2]
    """
    if not getattr(dataset, "prefetch", False) or len(chunks) < 2:
        for chunk in chunks:
            yield dataset.get_batch(indices[chunk], generator, train=True)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="gmix-prefetch") as pool:
        ahead = pool.submit(dataset.get_batch, indices[chunks[0]], generator, train=True)
        for nxt in chunks[1:]:
            batch = ahead.result()
            ahead = pool.submit(dataset.get_batch, indices[nxt], generator, train=True)
            yield batch
        yield ahead.result()


def _configure_model(model: nn.Module, config: TrainConfig) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if config.bn_momentum is not None:
                m.momentum = config.bn_momentum
            if config.bn_eps is not None:
                m.eps = config.bn_eps
    if config.bn_gamma0 is not None:
        from gmix_curvature import optim

        apply = getattr(optim, "apply_bn_gamma0", None)
        if apply is None:
            raise GmixError("bn_gamma0 needs gmix_curvature.optim.apply_bn_gamma0")
        apply(model, config.bn_gamma0)


def _load_data(config: TrainConfig) -> tuple[Any, Any]:
    train_ds = load_dataset(config.data, config.train_split, config.data_dir)
    eval_ds = load_dataset(config.data, config.eval_split, config.data_dir)
    return train_ds, eval_ds


def _tracer(config: TrainConfig, train_ds: Any) -> Callable[[nn.Module, int], dict[str, float]] | None:
    """Curvature along training (Issue 10): a fixed training subset, measured in eval mode."""
    if not config.trace_every:
        return None
    from gmix_curvature.curvature import curvature_snapshot
    from gmix_curvature.curvature.snapshot import snapshot_options

    g = torch.Generator().manual_seed(config.seed + 99)
    idx = torch.randperm(len(train_ds), generator=g)[: config.trace_samples]
    data = train_ds.get_batch(idx)

    def trace(model: nn.Module, step: int) -> dict[str, float]:
        return curvature_snapshot(
            model, data, method=config.trace_method, generator=torch.Generator().manual_seed(config.seed + step),
            **snapshot_options(train_ds),
        )

    return trace


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    datasets: tuple[Any, Any] | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    trust: bool = False,
) -> TrainResult:
    """Train with GradientMix (or the averaging baseline, ``noise="none"``) as ``config`` says.

    ``datasets`` = (train, eval) replaces loading by name (for tests and custom data). With ``config.out``
    set, metrics, config and checkpoints go there and ``resume=True`` continues from its checkpoint (read
    without running code; ``trust=True`` unpickles one that needs it in full, see :mod:`gmix_curvature.checkpoint`).
    The run draws from torch's global RNG (initialisation, dropout) inside ``torch.random.fork_rng``,
    seeded with ``config.seed``: the caller's global RNG state is left as it was.

    >>> cfg = TrainConfig(steps=2, batch_size=64, noise="gaussian", kappa_ratio=1.0, progress=False)
    >>> train(cfg).steps
    2
    """
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return _train(config, resume=resume, datasets=datasets, callback=callback, trust=trust)


def _os_error(exc: OSError) -> str:
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else (str(exc) or type(exc).__name__)


def _agree(ctx: DistContext, values: list[float]) -> list[float]:
    """Every rank's maximum of each value: a flag any rank raises is seen by all at the same point."""
    return ctx.all_reduce_max(values) if ctx.enabled else list(values)


def _train(
    config: TrainConfig,
    *,
    resume: bool,
    datasets: tuple[Any, Any] | None,
    callback: Callable[[int, dict[str, float]], None] | None,
    trust: bool,
) -> TrainResult:
    """One writer (rank 0 holds ``OUT/.lock``), stop signals turned into a clean stop, then the run."""
    t0 = time.perf_counter()
    ctx = init_distributed(config.device)
    out = Path(config.out) if config.out else None
    with contextlib.ExitStack() as stack:
        if out is not None:
            error: BaseException | None = None
            if ctx.is_main:
                try:
                    stack.enter_context(run_lock(out))
                except GmixError as exc:
                    error = exc
                except OSError as exc:  # OUT cannot be created
                    error = RunWriteError(f"cannot create the run directory {out}: {_os_error(exc)}")
            if _agree(ctx, [float(error is not None)])[0]:
                raise error if error is not None else GmixError(f"rank 0 could not lock {out}: see its message")
        stop = stack.enter_context(stop_on_signals(f"gmix (rank {ctx.rank}): " if ctx.enabled else "gmix: "))
        return _run(config, ctx, out, t0, stop, resume=resume, datasets=datasets, callback=callback, trust=trust)


def _run(
    config: TrainConfig,
    ctx: DistContext,
    out: Path | None,
    t0: float,
    stop: StopRequest,
    *,
    resume: bool,
    datasets: tuple[Any, Any] | None,
    callback: Callable[[int, dict[str, float]], None] | None,
    trust: bool,
) -> TrainResult:
    ckpt_path = out / "checkpoint.pt" if out else None
    saved: dict[str, Any] | None = None
    if resume:
        if ckpt_path is None:
            raise GmixError("resume needs an output directory (--out) holding checkpoint.pt")
        if not ckpt_path.exists():
            raise FileNotFoundError(f"nothing to resume: {ckpt_path} does not exist")
        saved = read_checkpoint(ckpt_path, trust=trust)
        if not isinstance(saved, Mapping) or saved.get("format") != FORMAT or "optimizer" not in saved:
            raise CheckpointError(f"{ckpt_path} is not a gmix training checkpoint")

    train_ds, eval_ds = datasets if datasets is not None else _load_data(config)
    cfg = resolve_config(config, len(train_ds))
    if saved is not None:
        mine, theirs = cfg.to_dict(), dict(saved["config"]["train"])
        differ = sorted(k for k in mine if k not in ("progress", "out", "device") and mine[k] != theirs.get(k))
        if differ:
            raise GmixError(f"--resume with a configuration that differs from the checkpoint's: {', '.join(differ)}")
    if cfg.mixing == "device" and ctx.enabled and cfg.groups != ctx.world_size and cfg.groups % ctx.world_size:
        raise GmixError(f"groups={cfg.groups} must be a multiple of the world size {ctx.world_size}")
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    device = ctx.device

    model_config = {
        "model": cfg.model,
        "model_kwargs": dict(cfg.model_kwargs),
        "num_classes": int(train_ds.num_classes),
        "input_shape": list(train_ds.input_shape),
        "data": cfg.data,
        "data_dir": cfg.data_dir,
        "train": cfg.to_dict(),
    }
    model = model_from_config(model_config).to(device=device, dtype=dtype)
    _configure_model(model, cfg)
    optimizer = optimizer_from_config(model, cfg)
    lr_fn = schedule_from_config(cfg, cfg.steps)
    peak = optimizer.param_groups[0]["lr"]
    for g in optimizer.param_groups:
        g.setdefault("lr_scale", g["lr"] / peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_fn(t) / peak)

    gens = {
        "mixing": torch.Generator().manual_seed(cfg.seed * 2 + 1),
        "augment": torch.Generator().manual_seed(cfg.seed * 2 + 2),
    }
    start_step = last_ckpt = 0
    # the training loss and accuracy since the last evaluation (checkpointed: a run stopped between two
    # evaluations resumes with them, so its next evaluation record is the uninterrupted run's)
    running = [0.0, 0.0, 0.0, 0.0]
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"], gens)
        start_step = last_ckpt = int(saved["step"])
        running = [float(v) for v in saved.get("running", running)]

    hook_state: MixingHookState | None = None
    net: nn.Module = model
    use_hook = cfg.mixing == "device" and ctx.enabled and cfg.groups == ctx.world_size
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if use_hook:
            hook_state = MixingHookState()
            net.register_comm_hook(hook_state, mixing_comm_hook)

    recorder = Recorder(out / "metrics.jsonl" if out and ctx.is_main else None)
    setup_error: RunWriteError | None = None
    if out and ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(model_config["train"], indent=2) + "\n")
            if saved is not None:
                recorder.truncate_after(start_step)
            elif (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()
        except OSError as exc:
            setup_error = RunWriteError(f"cannot write the run directory {out}: {_os_error(exc)}")
    if _agree(ctx, [float(setup_error is not None)])[0]:
        raise setup_error or RunWriteError(f"rank 0 could not write {out}: see its message")
    tracer = _tracer(cfg, train_ds)

    def checkpoint(step: int) -> RunWriteError | None:
        """Rank 0 writes the checkpoint of ``step`` (atomically); a failure is returned, not raised, so that every
        rank stops at the same point, and the previous checkpoint stays in place."""
        if ckpt_path is None or not ctx.is_main:
            return None
        recorder.sync()
        if recorder.error is not None:  # a checkpoint must not run ahead of its metrics
            return write_failure()
        try:
            save_checkpoint(
                {
                    "format": FORMAT,
                    "version": 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "running": [run_loss, run_correct, run_count, run_samples],
                    "rng": _rng_state(gens),
                    "config": model_config,
                },
                ckpt_path,
            )
        except OSError as exc:
            kept = f"the checkpoint of step {last_ckpt} is intact" if last_ckpt else "no checkpoint was written before"
            return RunWriteError(f"cannot write the checkpoint {ckpt_path}: {_os_error(exc)}; {kept}")
        return None

    def write_failure() -> RunWriteError | None:
        if recorder.error is not None:
            return RunWriteError(f"cannot write the metrics {recorder.path}: {_os_error(recorder.error)}")
        return None

    def stop_if_asked(done: int, wrote: bool, failure: RunWriteError | None) -> None:
        """At a step boundary: every rank learns whether a stop signal reached any rank and whether rank 0 failed
        to write (``failure``: this step's checkpoint); all stop together, after the checkpoint of this step."""
        nonlocal last_ckpt
        failure = failure or write_failure()
        signum, failed = _agree(ctx, [float(stop.signum or 0), float(failure is not None)])
        if failed:
            raise failure or RunWriteError(f"rank 0 could not write to {out}: see its message")
        if wrote and ckpt_path is not None:
            last_ckpt = done
        if not signum or done >= cfg.steps:
            return
        if not wrote:
            failure = checkpoint(done)
            if _agree(ctx, [float(failure is not None)])[0]:
                raise failure or RunWriteError(f"rank 0 could not write the checkpoint in {out}: see its message")
        recorder.sync()
        name = signal.Signals(int(signum)).name
        raise TrainingInterrupted(name, done, cfg.steps, out, ckpt_path)

    sampler = EpochSampler(len(train_ds), cfg.seed)
    B, b = cfg.batch_size, cfg.micro_batch_size
    local = ctx.local_slice(B)
    n_mixed = cfg.groups if cfg.mixing == "device" else B
    final: dict[str, float] = {}
    run_loss, run_correct, run_count, run_samples = running
    bar = None
    if cfg.progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    if tracer is not None and start_step == 0 and ctx.is_main:
        recorder.write({"kind": "trace", "step": 0, **tracer(model, 0)})

    model.train()
    try:
        for step in range(start_step, cfg.steps):
            indices = sampler.batch(step, B)
            pi = noise_mod.sample_weights(cfg.noise, n_mixed, cfg.kappa, gens["mixing"], dtype=torch.float64)
            gamma_t = noise_mod.gamma(pi)
            weights = expand_group_weights(pi, B) if cfg.mixing == "device" else pi
            aug_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gens["augment"])))
            optimizer.zero_grad(set_to_none=True)
            positions = torch.arange(B)[local]
            if use_hook:
                # the hook scales the mean local gradient by K·π_k; the local loss is a plain mean
                hook_state.scale = float(cfg.groups * pi[ctx.rank])
                weights = torch.full((B,), ctx.world_size / B, dtype=torch.float64)
            loss_scale = ctx.world_size if not use_hook else 1.0
            loss_sum = mixed_sum = correct_sum = count_sum = 0.0
            chunks = positions.split(b)
            for i, (chunk, (x, y)) in enumerate(zip(chunks, micro_batches(train_ds, indices, chunks, aug_gen))):
                x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
                y = y.to(device)
                sync = nullcontext() if (i == len(chunks) - 1 or not ctx.enabled) else net.no_sync()
                with sync:
                    losses, correct = per_sample_losses(net, train_ds, x, y, cfg.label_smoothing)
                    w = weights[chunk].to(device=device, dtype=losses.dtype)
                    mixed = (w * losses).sum()
                    (mixed * loss_scale).backward()
                loss_sum += float(losses.detach().sum())
                mixed_sum += float(mixed.detach())
                correct_sum += float(correct)
                count_sum += float(train_ds.count(y)) if hasattr(train_ds, "count") else len(chunk)
            sums = ctx.all_reduce_sum([loss_sum, mixed_sum, correct_sum, count_sum])
            loss_sum, mixed_sum, correct_sum, count_sum = sums
            if use_hook:
                mixed_sum = float("nan")  # the mixing happens in the hook; the per-rank mixed loss is not formed
            mean_loss = loss_sum / B
            if not math.isfinite(mean_loss) or (use_hook is False and not math.isfinite(mixed_sum)):
                kept = "no checkpoint yet"
                if last_ckpt:
                    kept = f"the checkpoint of step {last_ckpt} in {ckpt_path} is kept"
                raise TrainingDiverged(f"non-finite loss ({mean_loss}) at step {step + 1}; {kept}")
            grad_norm = float(
                torch.linalg.vector_norm(
                    torch.stack([p.grad.detach().norm() for p in model.parameters() if p.grad is not None])
                )
            )
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            run_loss += loss_sum
            run_correct += correct_sum
            run_count += count_sum
            run_samples += B
            done = step + 1
            record = {
                "kind": "step",
                "step": done,
                "epoch": done * B / len(train_ds),
                "loss": mean_loss,
                "mixed_loss": mixed_sum,
                "lr": lr_now,
                "gamma": gamma_t,
                "grad_norm": grad_norm,
            }
            recorder.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.3g}")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                ev = evaluate(net.module if ctx.enabled else model, eval_ds, device=device, dtype=dtype, ctx=ctx)
                final = {
                    "train_loss": run_loss / run_samples,
                    "train_acc": run_correct / run_count,
                    "test_loss": ev["loss"],
                    "test_acc": ev["acc"],
                }
                recorder.write({"kind": "eval", "step": done, "epoch": done * B / len(train_ds), **final})
                run_loss = run_correct = run_count = run_samples = 0.0
                if callback is not None:
                    callback(done, final)
            if tracer is not None and ctx.is_main and (done % cfg.trace_every == 0 or done == cfg.steps):
                model.eval()
                recorder.write({"kind": "trace", "step": done, **tracer(model, done)})
                model.train()
            wrote = done % cfg.checkpoint_every == 0 or done == cfg.steps
            stop_if_asked(done, wrote, checkpoint(done) if wrote else None)
    finally:  # a stop, a failure or a divergence closes the bar too
        if bar is not None:
            bar.close()
    if not final:  # resumed a run that had already finished
        ev = evaluate(model, eval_ds, device=device, dtype=dtype, ctx=ctx)
        final = {"test_loss": ev["loss"], "test_acc": ev["acc"]}
    model.eval()
    return TrainResult(model, cfg, cfg.steps, final, time.perf_counter() - t0, out)
