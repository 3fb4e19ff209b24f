"""The device-wise GradientMix hook vs PyTorch's default allreduce, 2 gloo ranks on CPU (goal: ≤ 1.05×).

Each rank runs forward + backward of an MLP (≈4.2M parameters, several gradient buckets) under DDP;
the two hooks alternate in rounds so drifting machine load hits both alike. Reported: median seconds
per step for each and their ratio. Run: ``.venv/bin/python bench/ddp_hook.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gmix_curvature.distributed import MixingHookState, mixing_comm_hook

ROUNDS, STEPS = 6, 10


def build() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    default = nn.parallel.DistributedDataParallel(build())
    mixed = nn.parallel.DistributedDataParallel(build())
    state = MixingHookState(scale=1.3 if rank == 0 else 0.7)
    mixed.register_comm_hook(state, mixing_comm_hook)
    x, y = torch.randn(64, 1024), torch.randint(0, 10, (64,))
    times = {"default allreduce": [], "GradientMix hook": []}
    for _ in range(ROUNDS):
        for name, net in (("default allreduce", default), ("GradientMix hook", mixed)):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()  # warm-up step of this round
            dist.barrier()
            t = time.perf_counter()
            for _ in range(STEPS):
                net.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
            dist.barrier()
            times[name].append((time.perf_counter() - t) / STEPS)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def main() -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=600)
    for p in procs:
        p.join()
    base = statistics.median(times["default allreduce"])
    print(f"{'hook':<20} {'s/step (median)':>16} {'ratio':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<20} {med:>16.4f} {med / base:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
