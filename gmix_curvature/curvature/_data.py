"""Data for the estimators: an (x, y) pair, a data set, or any re-iterable of (x, y) batches.

Every batch is weighted by its size, so the estimators compute means over samples whatever the
batching (a smaller last batch biases nothing). Under ``torchrun`` (an initialised process group)
each rank takes every world-size-th batch and the per-probe sums are all-reduced, so the result does
not depend on the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gmix_curvature.errors import GmixError

__all__ = ["Batches", "as_batches", "all_reduce_sum", "world"]


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

    def _all(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        src = self.source
        if isinstance(src, tuple | list) and len(src) == 2 and isinstance(src[0], torch.Tensor):
            batches: Iterable = [src]
        elif hasattr(src, "tensors") and callable(src.tensors):
            batches = [src.tensors()]
        else:
            batches = src
        for batch in batches:
            if not (isinstance(batch, tuple | list) and len(batch) >= 2):
                raise GmixError(f"each batch must be an (x, y) pair, got {type(batch).__name__}")
            x, y = batch[0], batch[1]
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise GmixError("each batch must hold tensors x and y")
            if y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise GmixError(
                    f"labels must be a 1-d tensor as long as the batch: x {tuple(x.shape)}, y {tuple(y.shape)}"
                )
            if y.dtype.is_floating_point or y.dtype == torch.bool:
                raise GmixError(f"labels must be integer class indices, got {y.dtype}")
            step = self.batch_size or max(int(y.shape[0]), 1)
            for start in range(0, int(y.shape[0]), step):
                yield x[start : start + step], y[start : start + step]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        rank, size = world()
        for i, (x, y) in enumerate(self._all()):
            if i % size != rank or y.shape[0] == 0:
                continue
            if self.dtype is not None and x.dtype.is_floating_point:
                x = x.to(self.dtype)
            yield i, x.to(self.device), y.to(self.device)

    def count(self) -> int:
        """The number of samples over all ranks (raises on empty data)."""
        n = sum(int(y.shape[0]) for _, _, y in self)
        total = int(all_reduce_sum(torch.tensor(float(n))).item())
        if total == 0:
            raise GmixError("the data is empty: no samples to measure curvature on")
        return total


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


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Labels must lie in 0..C-1 for a C-output model."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise GmixError(
            f"labels out of range: found {int(y.min())}..{int(y.max())} for a model with {num_classes} outputs"
        )
