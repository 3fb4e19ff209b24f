"""Logical batch 8192 by accumulation on CPU: peak memory and throughput of the engine (issue 6).

* memory: peak RSS growth of ``train`` at B = 8192 in micro-batches of 256, vs one step of B = 256 with
  no accumulation (goal ≤ 1.1×) — each measured in a fresh process (VmHWM is a high-water mark);
* throughput: samples/s of ``train`` at B = 8192 vs a plain hand-written accumulation loop over the same
  micro-batches (mean cross-entropy, SGD) in the same process, alternating (goal ≥ 0.95×).

Model: an MLP (3·32·32 → 512 → 512 → 10) on the synthetic CIFAR-shaped set. Run:
``.venv/bin/python bench/accumulation.py``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

B, MICRO, STEPS, ROUNDS = 8192, 256, 2, 3
CFG = dict(model="mlp", model_kwargs={"hidden": [512, 512]}, data="synthetic", optimizer="sgd", lr=0.01,
           noise="gaussian", kappa_ratio=1.0, eval_every=10**6, progress=False, device="cpu")  # fmt: skip


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def memory_child(batch: int) -> None:
    from gmix_curvature.data import load_dataset
    from gmix_curvature.train import TrainConfig, train

    data = (load_dataset("synthetic", "train"), load_dataset("synthetic", "test").subset(64))
    train(TrainConfig(**CFG, batch_size=MICRO, micro_batch_size=MICRO, steps=1), datasets=data)  # warm: imports
    before = _peak_mb()
    train(TrainConfig(**CFG, batch_size=batch, micro_batch_size=MICRO, steps=1), datasets=data)
    print(json.dumps({"before": before, "after": _peak_mb()}))


def plain_loop(data, steps: int) -> None:
    import torch

    from gmix_curvature.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=(3, 32, 32), hidden=(512, 512))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (B,), generator=g)
        opt.zero_grad()
        for chunk in idx.split(MICRO):
            x, y = data.get_batch(chunk)
            (torch.nn.functional.cross_entropy(model(x), y) * (len(chunk) / B)).backward()
        opt.step()


def main() -> int:
    if len(sys.argv) > 1:
        memory_child(int(sys.argv[1]))
        return 0
    mem = {}
    for batch in (MICRO, B):
        out = subprocess.run([sys.executable, __file__, str(batch)], capture_output=True, text=True, check=True)
        mem[batch] = json.loads(out.stdout.strip().splitlines()[-1])
    grow = {b: max(m["after"] - m["before"], 0.0) for b, m in mem.items()}

    from gmix_curvature.data import load_dataset
    from gmix_curvature.train import TrainConfig, train

    data = (load_dataset("synthetic", "train"), load_dataset("synthetic", "test").subset(64))
    times = {"engine": [], "plain loop": []}
    for _ in range(ROUNDS):
        t = time.perf_counter()
        train(TrainConfig(**CFG, batch_size=B, micro_batch_size=MICRO, steps=STEPS), datasets=data)
        times["engine"].append(STEPS * B / (time.perf_counter() - t))
        t = time.perf_counter()
        plain_loop(data[0], STEPS)
        times["plain loop"].append(STEPS * B / (time.perf_counter() - t))
    print(f"peak RSS: B={MICRO} step {mem[MICRO]['after']:.0f} MB, B={B} by accumulation {mem[B]['after']:.0f} MB "
          f"-> ratio {mem[B]['after'] / mem[MICRO]['after']:.3f} (growth over the warm process: "
          f"{grow[MICRO]:.0f} MB vs {grow[B]:.0f} MB)")  # fmt: skip
    eng, plain = statistics.median(times["engine"]), statistics.median(times["plain loop"])
    print(f"{'loop':<12} {'samples/s (median)':>20}")
    print(f"{'plain loop':<12} {plain:>20.0f}\n{'engine':<12} {eng:>20.0f}")
    print(f"throughput ratio engine/plain: {eng / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
