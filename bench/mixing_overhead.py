"""GradientMix's cost per step against the plain mean-loss step, beside per-sample-gradient methods.

Times one training step (forward, backward, SGD update) of the CIFAR ResNet-18 on a batch of CIFAR-shaped
data, float32, on the CPU (default) or a GPU (``--device cuda``), for:

- ``plain``: mean loss, one backward (the baseline);
- ``gmix``: GradientMix (Eq. 4) as the toolkit does it: Σ_b π_b ℓ_b, one backward, π drawn each step;
- ``vmap``: per-sample gradients with torch.func (vmap over grad), then Σ_b π_b g_b;
- ``backpack``: per-sample gradients with BackPACK's BatchGrad (converter for the residual net), then Σ_b π_b g_b.

The methods run interleaved (A B C D A B C D …) so a drifting machine affects all alike; the table shows
each method's median step time and the median of its per-rep ratio to ``plain``. Peak memory is measured per method
in a fresh subprocess: its peak resident set size (VmHWM; torch itself included, the same for every method), or
on a GPU its peak allocated CUDA memory (``torch.cuda.max_memory_allocated``).

    python bench/mixing_overhead.py [--width 64] [--batch 64] [--reps 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from gmix_curvature.mixing import mixed_loss
from gmix_curvature.models import CifarResNet18
from gmix_curvature.noise import sample_weights

METHODS = ("plain", "gmix", "vmap", "backpack")


def make_step(method: str, width: int, batch: int, device: str = "cpu"):
    torch.manual_seed(0)
    model = CifarResNet18(10, width=width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    params = dict(model.named_parameters())

    if method == "plain":

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    elif method == "gmix":

        def step():
            opt.zero_grad()
            pi = sample_weights("gaussian", batch, 2.0 / batch, g).to(device)
            mixed_loss(F.cross_entropy(model(x), y, reduction="none"), pi).backward()
            opt.step()

    elif method == "vmap":
        from torch.func import functional_call, grad, vmap

        buffers = dict(model.named_buffers())
        model.eval()  # per-sample gradients need per-sample-independent BatchNorm (running statistics)

        def loss1(p, xb, yb):
            out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
            return F.cross_entropy(out, yb.unsqueeze(0))

        ps_grad = vmap(grad(loss1), in_dims=(None, 0, 0))

        def step():
            opt.zero_grad()
            pi = sample_weights("gaussian", batch, 2.0 / batch, g).to(device)
            grads = ps_grad({k: v.detach() for k, v in params.items()}, x, y)
            for k, p in params.items():
                p.grad = torch.einsum("b,b...->...", pi, grads[k])
            opt.step()

    elif method == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad

        model.eval()  # BackPACK refuses BatchNorm in train mode for per-sample quantities
        model = extend(model, use_converter=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        lossfn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

        def step():
            opt.zero_grad()
            pi = sample_weights("gaussian", batch, 2.0 / batch, g).to(device)
            with backpack(BatchGrad()):
                lossfn(model(x), y).backward()
            for p in model.parameters():
                p.grad = torch.einsum("b,b...->...", pi, p.grad_batch)
            opt.step()

    else:
        raise ValueError(method)
    return step


def memory_of(method: str, width: int, batch: int, device: str = "cpu", steps: int = 2) -> float:
    """Peak memory (MB) of a fresh process that builds one method and runs ``steps`` steps: resident (CPU) or
    allocated on the GPU."""
    if device.startswith("cuda"):
        peak = "import torch; print(json.dumps(torch.cuda.max_memory_allocated() / 2**20))"
    else:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork and exec
        peak = ("hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1];"
                "print(json.dumps(int(hwm) / 1024))")  # fmt: skip
    code = (
        "import json, sys; sys.path.insert(0, 'bench');"
        "from mixing_overhead import make_step;"
        f"s = make_step({method!r}, {width}, {batch}, {device!r});"
        f"[s() for _ in range({steps})];" + peak
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = {m: make_step(m, args.width, args.batch, args.device) for m in args.methods}
    for s in steps.values():  # warm-up (twice: cuDNN picks its algorithms on the first call)
        s(), s()
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.reps):
        for m, s in steps.items():
            sync()
            t = time.perf_counter()
            s()
            sync()
            times[m].append(time.perf_counter() - t)
    base = statistics.median(times["plain"]) if "plain" in times else None
    where = torch.cuda.get_device_name() if cuda else f"CPU threads {torch.get_num_threads()}"
    print(f"CIFAR ResNet-18 width {args.width}, batch {args.batch}, {where}, {args.reps} interleaved reps")
    print(f"{'method':10s} {'median s/step':>14s} {'min':>8s} {'max':>8s} {'vs plain':>9s} {'peak MB':>9s}")
    rows = {}
    for m in args.methods:
        med = statistics.median(times[m])
        mem = memory_of(m, args.width, args.batch, args.device)
        # the median of the per-rep ratios: each pair ran back to back
        ratio = statistics.median(a / b for a, b in zip(times[m], times["plain"])) if base else float("nan")
        rows[m] = {"median_s": med, "ratio_vs_plain": ratio, "peak_mb": mem}
        print(f"{m:10s} {med:14.3f} {min(times[m]):8.3f} {max(times[m]):8.3f} {ratio:9.2f} {mem:9.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
