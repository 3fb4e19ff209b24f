"""Benchmark of the Tr(G) estimators on the CIFAR ResNet-18 in eval mode (issue 9), side by side in one run.

Networks: untrained with calibrated BatchNorm statistics; trained with Adam until it memorises its random
CIFAR-shaped samples; optionally (--scaled-head) the untrained one with its head scaled to a mean top
probability of 0.999 (a quick extra case: its G is dominated by a few directions).

Parts (each prints a table):
  a  exact Tr(G) vs BackPACK DiagGGNExact with its converter: seconds and peak memory (child processes)
  b  seconds per pass and relative sd of one pass of every stochastic estimator, time to a 1 % relative
     standard error (seconds/pass × (sd/0.01)²), vs PyHessian's Hutchinson (Hessian; = Tr(G) in
     expectation here: ReLU network in eval mode)
  c  curvlinops xtrace on its GGNLinearOperator: relative spread over repeats at a number of products,
     extrapolated to 1 % assuming spread ∝ 1/products
  d  the same with a 100-class head: the best stochastic estimator to 1 % vs exact
  e  one per-sample-norm pass by backend: layer rules (ghost/materialise chosen per layer, or forced),
     torch.func, BackPACK BatchL2Grad

Run: .venv/bin/python bench/curvature.py [--width 16] [--samples 128] [--parts abcde]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

from gmix_curvature.curvature import exact_ggn_trace, ggn_trace
from gmix_curvature.curvature._norms import PerSampleNorms
from gmix_curvature.models import CifarResNet18

warnings.filterwarnings("ignore")


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 2**20  # GiB
    return math.nan


def in_child(which: str, args: argparse.Namespace) -> dict:
    """Run one measurement of part (a) in a fresh process (fork would deadlock the OpenMP pool): its
    seconds, its peak resident memory above the resident memory before the measurement, its value."""
    cmd = [sys.executable, __file__, "--child", which, "--width", str(args.width), "--samples", str(args.samples),
           "--batch", str(args.batch)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"seconds": math.nan, "peak_gib": math.nan, "value": math.nan, "error": proc.stderr.strip()[-100:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(which: str, args: argparse.Namespace) -> None:
    x, y = make_data(args.samples, 10)
    net = calibrate(make_net(10, args.width), x)
    base = _vm("VmRSS")
    start = time.perf_counter()
    if which == "exact":
        value = exact_ggn_trace(net, (x, y), batch_size=args.batch).value
    else:
        value = backpack_diag_ggn(net, x, y, args.batch)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": _vm("VmHWM") - base, "value": value}))


def make_data(samples: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(samples, 3, 32, 32, generator=g), torch.randint(0, classes, (samples,), generator=g)


def make_net(classes: int, width: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return CifarResNet18(classes, width=width)


def calibrate(net: nn.Module, x: torch.Tensor) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), 128):
            net(x[i : i + 128])
    return net.eval()


def top_prob(net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.softmax(net(x), 1).max(1).values.mean())


def memorise(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, target: float = 0.999) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        net.train()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        calibrate(net, x)
        if top_prob(net, x) >= target:
            break
    return calibrate(net, x)


def scaled_head(net: nn.Module, x: torch.Tensor, target: float = 0.999) -> nn.Module:
    net = copy.deepcopy(net)
    lo, hi = 1.0, 1.0
    w0, b0 = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    while True:
        with torch.no_grad():
            net.fc.weight.copy_(w0 * hi)
            net.fc.bias.copy_(b0 * hi)
        if top_prob(net, x) >= target or hi > 1e6:
            break
        lo, hi = hi, hi * 2
    for _ in range(30):
        mid = (lo + hi) / 2
        with torch.no_grad():
            net.fc.weight.copy_(w0 * mid)
            net.fc.bias.copy_(b0 * mid)
        lo, hi = (lo, mid) if top_prob(net, x) >= target else (mid, hi)
    with torch.no_grad():
        net.fc.weight.copy_(w0 * hi)
        net.fc.bias.copy_(b0 * hi)
    return net


def backpack_diag_ggn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model = extend(copy.deepcopy(net), use_converter=True)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    total = 0.0
    for i in range(0, len(y), batch):
        model.zero_grad()
        with backpack(DiagGGNExact()):
            loss_fn(model(x[i : i + batch]), y[i : i + batch]).backward()
        total += sum(float(p.diag_ggn_exact.sum()) for p in model.parameters())
    return total / len(y)


def part_a(args):
    print("\n(a) untrained network: exact Tr(G) vs BackPACK DiagGGNExact (converter), each in a fresh process;")
    print("    peak GiB = peak resident memory above the resident memory before the measurement")
    print(f"{'method':<22} {'Tr(G)':>12} {'seconds':>9} {'peak GiB':>9}")
    for label, which in (("exact (ours)", "exact"), ("BackPACK DiagGGNExact", "backpack")):
        r = in_child(which, args)
        err = f"  {r['error']}" if "error" in r else ""
        print(f"{label:<22} {r['value']:>12.6g} {r['seconds']:>9.2f} {r['peak_gib']:>9.3f}{err}")


def per_pass(net, x, y, method, probes, batch):
    r = ggn_trace(net, (x, y), method, num_probes=probes, generator=0, batch_size=batch)
    values = r.extra["probe_values"]
    return r.seconds / probes, statistics.stdev(values) / abs(statistics.mean(values)), r.value


def pyhessian_pass(net, x, y, probes, batch):
    from pyhessian import hessian

    h = hessian(copy.deepcopy(net), nn.CrossEntropyLoss(), dataloader=[(x[i : i + batch], y[i : i + batch])
                for i in range(0, len(y), batch)], cuda=False)  # fmt: skip
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        values = h.trace(maxIter=probes, tol=0.0)
    sec = (time.perf_counter() - start) / probes
    # PyHessian's dataloader path sums per-batch averages weighted by batch size / n: the mean Hessian.
    return sec, statistics.stdev(values) / abs(statistics.mean(values)), statistics.mean(values)


def part_b(nets, x, y, batch, probes, exact_values):
    print("\n(b) stochastic estimators: seconds a pass, relative sd of one pass, time to 1 % = s/pass × (sd/1 %)²")
    print(f"{'network':<14} {'method':<18} {'estimate':>11} {'exact':>11} {'s/pass':>8} {'rel sd':>8} "
          f"{'s to 1 %':>10} {'vs PyHessian':>12}")  # fmt: skip
    best = {}
    for name, net in nets.items():
        rows = []
        for method in ("fisher_is", "output_hutchinson", "fisher_mc", "hutchinson"):
            sec, rsd, val = per_pass(net, x, y, method, probes, batch)
            rows.append((method, val, sec, rsd))
        sec, rsd, val = pyhessian_pass(net, x, y, max(probes // 2, 2), batch)
        ph_time = sec * (rsd / 0.01) ** 2
        rows.append(("PyHessian (H)", val, sec, rsd))
        for method, val, sec, rsd in rows:
            t1 = sec * max((rsd / 0.01) ** 2, 1.0)
            print(f"{name:<14} {method:<18} {val:>11.5g} {exact_values[name]:>11.5g} {sec:>8.2f} {rsd:>8.2%} "
                  f"{t1:>10.1f} {ph_time / t1:>11.0f}x")  # fmt: skip
        best[name] = min((sec * max((rsd / 0.01) ** 2, 1.0), m) for m, _, sec, rsd in rows[:2])
    return best


def part_c(nets, x, y, batch, matvecs, repeats, exact_values, best):
    from curvlinops import GGNLinearOperator, xtrace

    print("\n(c) curvlinops xtrace on GGNLinearOperator: relative spread around exact over repeats")
    print(f"{'network':<14} {'products':>8} {'rel spread':>10} {'seconds':>9} {'s to 1 % (∝1/m)':>16} "
          f"{'best ours to 1 %':>17} {'ratio':>7}")  # fmt: skip
    for name, net in nets.items():
        params = [p for p in net.parameters() if p.requires_grad]
        data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
        op = GGNLinearOperator(net, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
        for m in matvecs:
            vals, start = [], time.perf_counter()
            for _ in range(repeats):
                vals.append(float(xtrace(op, m)))
            sec = (time.perf_counter() - start) / repeats
            ex = exact_values[name]
            spread = math.sqrt(statistics.fmean([(v - ex) ** 2 for v in vals])) / ex
            t1 = sec * max(spread / 0.01, 1.0)
            ours, method = best[name]
            print(f"{name:<14} {m:>8} {spread:>10.2%} {sec:>9.1f} {t1:>16.1f} {ours:>12.1f} ({method[:4]}) "
                  f"{t1 / ours:>6.0f}x")  # fmt: skip


def part_d(net, x, y, batch, probes):
    print("\n(d) 100-class head: best stochastic estimator to 1 % vs exact")
    exact = exact_ggn_trace(net, (x, y), batch_size=batch)
    sec, rsd, val = per_pass(net, x, y, "fisher_is", probes, batch)
    t1 = sec * max((rsd / 0.01) ** 2, 1.0)
    print(f"exact {exact.value:.5g} in {exact.seconds:.1f} s; fisher_is {val:.5g}: {sec:.2f} s/pass, "
          f"rel sd {rsd:.2%} a pass, {t1:.1f} s to 1 % -> {exact.seconds / t1:.0f}x faster than exact")
    r = ggn_trace(net, (x, y), "auto", generator=0, batch_size=batch)
    print(f"auto chose {r.method}: {r.value:.5g} ± {r.stderr or 0:.3g} in {r.seconds:.1f} s ({r.extra.get('auto')})")


def part_e(net, x, y, batch):
    print("\n(e) one per-sample-norm pass (forward + one backward + norms) by backend")
    print(f"{'backend':<28} {'seconds':>8}")
    v = torch.randn(len(y), net.fc.out_features)
    for label, backend, rule in (("layer rules (auto per layer)", "hooks", None), ("layer rules, all ghost", "hooks",
                                 "ghost"), ("layer rules, all materialise", "hooks", "materialise"),
                                 ("torch.func vmap(grad)", "func", None)):  # fmt: skip
        psn = PerSampleNorms(net, dict(net.named_parameters()), backend, conv_rule=rule)
        start = time.perf_counter()
        for i in range(0, len(y), batch):
            psn.forward(x[i : i + batch])
            psn.norms(v[i : i + batch])
        print(f"{label:<28} {time.perf_counter() - start:>8.2f}")
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        model = extend(copy.deepcopy(net), use_converter=True)
        start = time.perf_counter()
        for i in range(0, len(y), batch):
            model.zero_grad()
            with backpack(BatchL2Grad()):
                (model(x[i : i + batch]) * v[i : i + batch]).sum().backward()
        print(f"{'BackPACK BatchL2Grad':<28} {time.perf_counter() - start:>8.2f}")
    except Exception as exc:
        print(f"{'BackPACK BatchL2Grad':<28} failed: {exc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--matvecs", default="12,24")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="abcde")
    ap.add_argument("--scaled-head", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args)
    x, y = make_data(args.samples, 10)
    print(f"CIFAR ResNet-18 width {args.width}, {args.samples} CIFAR-shaped samples, float32, eval mode, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")  # fmt: skip
    fresh = calibrate(make_net(10, args.width), x)
    nets = {"untrained": fresh}
    if set(args.parts) & set("bc"):
        start = time.perf_counter()
        nets["trained"] = memorise(copy.deepcopy(fresh), x, y, args.train_steps)
        print(f"trained {time.perf_counter() - start:.0f} s to mean top probability {top_prob(nets['trained'], x):.4f}")
    if args.scaled_head:
        nets["scaled head"] = scaled_head(fresh, x)
    for name, net in nets.items():
        print(f"{name}: mean top softmax probability {top_prob(net, x):.4f}")
    exact_values = {}
    for name, net in nets.items():
        r = exact_ggn_trace(net, (x, y), batch_size=args.batch)
        exact_values[name] = r.value
        print(f"exact Tr(G) {name}: {r.value:.6g} ({r.seconds:.1f} s)")
    if "a" in args.parts:
        part_a(args)
    best = part_b(nets, x, y, args.batch, args.probes, exact_values) if set(args.parts) & set("bc") else {}
    if "c" in args.parts:
        part_c(nets, x, y, args.batch, [int(m) for m in args.matvecs.split(",")], args.repeats, exact_values, best)
    if "d" in args.parts:
        _, y100 = make_data(args.samples, 100)
        net100 = calibrate(make_net(100, args.width), x)
        part_d(net100, x, y100, args.batch, args.probes)
    if "e" in args.parts:
        part_e(fresh, x, y, args.batch)


if __name__ == "__main__":
    main()
