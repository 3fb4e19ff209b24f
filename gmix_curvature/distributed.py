"""torch.distributed plumbing for the training engine: process group, slices, and the device-wise hook.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) the engine runs
one DDP replica per process; otherwise everything here degrades to the single-process case.

Sample-wise mixing (Eq. 4) across ranks: every rank draws the *same* global weights π ∈ R^B from the
shared mixing generator and uses its own slice of the global batch; its local loss is
W·Σ_{b ∈ slice} π_b ℓ_b, so DDP's allreduce-mean gives exactly Σ_b π_b ∇ℓ_b.

Device-wise mixing (Eq. 3) with one group per rank: each rank back-propagates its plain mean loss
(local gradient g_k) and :func:`mixing_comm_hook` scales the gradient bucket by K·π_k before DDP's
allreduce-mean, giving Σ_k π_k g_k; π is drawn identically on every rank.
"""


import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "MixingHookState", "mixing_comm_hook"]


@dataclass
class DistContext:
    """Where this process stands: its rank, the world size, and the torch device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, batch_size: int) -> slice:
        """This rank's contiguous share of positions 0..batch_size-1 of the global batch."""
        if batch_size % self.world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by the world size {self.world_size}")
        n = batch_size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a list of floats over all ranks (identity in one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_max(self, values: list[float]) -> list[float]:
        """The maximum of each float over all ranks (identity in one process): how ranks agree on a flag that any
        one of them may raise, e.g. a stop signal that reached only one rank."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _destroy_at_exit() -> None:
    """Destroy the process group while the interpreter is fully alive: otherwise gloo's worker threads can
    still hold tensors when Python finalises, and the process dies with SIGABRT ("terminate called without an
    active exception") after its work is done. A no-op when the caller already destroyed it."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on CUDA); a group created here
    is destroyed at interpreter exit unless the caller destroys it first.

    >>> init_distributed("cpu").world_size  # not under torchrun
    1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world <= 1:
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        atexit.register(_destroy_at_exit)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


@dataclass
class MixingHookState:
    """The current step's scale K·π_k for this rank, set by the engine before each synchronising backward."""

    scale: float = 1.0
    process_group: object = None


def mixing_comm_hook(state: MixingHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook for device-wise GradientMix (Eq. 3): allreduce-mean of K·π_k·g_k.

    Register with ``ddp_model.register_comm_hook(state, mixing_comm_hook)``; set ``state.scale = K * pi[rank]``
    before the backward pass that synchronises.
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    buf.mul_(state.scale / world)
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
