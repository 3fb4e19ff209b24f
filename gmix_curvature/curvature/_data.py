"""Data for the estimators: an (x, y) pair, a data set, or any re-iterable of (x, y) batches. x is a
batch-first tensor or a mapping of batch-first tensors (``input_ids``, ``attention_mask``, …: the model is
then called as ``model(**x)``); y holds the labels or targets, batch-first (its shape is checked against the
model's output by the loss, see ``_loss``).

Every batch is weighted by its size, so the estimators compute means over samples whatever the
batching (a smaller last batch biases nothing). Under ``torchrun`` (an initialised process group)
each rank takes every world-size-th batch and the per-probe sums are all-reduced, so the result does
not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gmix_curvature.errors import GmixError

__all__ = ["Batches", "as_batches", "all_reduce_sum", "world", "batch_len", "slice_input", "move_input"]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in one process); reduced in float64 (on the GPU for nccl)."""
    if world()[1] == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = t.detach().to(device, torch.float64).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device, t.dtype)


@dataclass
class Batches:
    """A re-iterable of (index, x, y) over this rank's share of the batches."""

    source: Any
    batch_size: int | None
    device: torch.device | None
    dtype: torch.dtype | None

    def _all(self) -> Iterator[tuple[Any, torch.Tensor]]:
        src = self.source
        if isinstance(src, tuple | list) and len(src) == 2 and isinstance(src[0], torch.Tensor | Mapping):
            batches: Iterable = [src]
        elif hasattr(src, "tensors") and callable(src.tensors):
            batches = [src.tensors()]
        else:
            batches = src
        for batch in batches:
            if isinstance(batch, Mapping):
                raise GmixError(
                    "each batch must be an (x, y) pair, got a mapping: pass (inputs, labels) with the labels aligned "
                    "to the logits (a causal LM's shifted by one, ignore_index where nothing is predicted)"
                )
            if not (isinstance(batch, tuple | list) and len(batch) >= 2):
                raise GmixError(f"each batch must be an (x, y) pair, got {type(batch).__name__}")
            x, y = batch[0], batch[1]
            if not isinstance(y, torch.Tensor) or not _is_input(x):
                raise GmixError("each batch must hold a tensor (or a mapping of tensors) x and a tensor y")
            size = batch_len(x)
            if y.ndim == 0 or y.shape[0] != size:
                raise GmixError(
                    f"labels must be as long as the batch: x {_describe(x)}, y {tuple(y.shape)}"
                )
            step = self.batch_size or max(size, 1)
            for start in range(0, size, step):
                yield slice_input(x, start, start + step), y[start : start + step]

    def __iter__(self) -> Iterator[tuple[int, Any, torch.Tensor]]:
        rank, size = world()
        for i, (x, y) in enumerate(self._all()):
            if i % size != rank or y.shape[0] == 0:
                continue
            yield i, move_input(x, self.device, self.dtype), y.to(self.device)

    def count(self) -> int:
        """The number of samples over all ranks (raises on empty data)."""
        n = sum(int(y.shape[0]) for _, _, y in self)  # samples
        total = int(all_reduce_sum(torch.tensor(float(n))).item())
        if total == 0:
            raise GmixError("the data is empty: no samples to measure curvature on")
        return total


def _is_input(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, Mapping) and len(x) > 0 and all(isinstance(v, torch.Tensor) for v in x.values())
    )


def _describe(x: Any) -> str:
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in x.items()) + "}"
    return str(tuple(x.shape))


def batch_len(x: Any) -> int:
    """The batch size of x: a batch-first tensor, or a mapping of batch-first tensors of one batch size."""
    if isinstance(x, Mapping):
        sizes = {int(v.shape[0]) if v.ndim else -1 for v in x.values()}
        if len(sizes) != 1 or -1 in sizes:
            raise GmixError(f"the tensors of a mapping input must share their first (batch) dimension: {_describe(x)}")
        return sizes.pop()
    if x.ndim == 0:
        raise GmixError("x must be a batch-first tensor, got a scalar")
    return int(x.shape[0])


def slice_input(x: Any, start: int, stop: int) -> Any:
    """Samples start..stop of a batch-first tensor or of every tensor of a mapping."""
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def move_input(x: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """x on ``device``, its floating-point tensors in ``dtype`` (token ids and masks keep theirs)."""
    if isinstance(x, Mapping):
        return {k: move_input(v, device, dtype) for k, v in x.items()}
    if dtype is not None and x.dtype.is_floating_point:
        x = x.to(dtype)
    return x.to(device)


def as_batches(
    data: Any, *, batch_size: int | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Batches:
    """Wrap ``data`` (see the module docstring); a one-shot iterator is materialised once."""
    if batch_size is not None and batch_size < 1:
        raise GmixError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, Iterator):
        data = list(data)
    if data is None:
        raise GmixError("no data given")
    return Batches(data, batch_size, device, dtype)
