"""Benchmark of the Tr(G) estimators on the CIFAR ResNet-18 in eval mode (issue 9), side by side in one run.

Networks (parts b, c, d), for each head in --classes: untrained with calibrated BatchNorm statistics; trained
with full-batch Adam until it memorises its random CIFAR-shaped samples (mean top softmax probability >= 0.999);
optionally "scaled": the untrained one with its head scaled to a mean top probability of 0.999.

"Time to 1 %" is the same for every estimator: seconds a unit (a pass, an xtrace call) × (relative sd of one
unit / 1 %)², at least one unit — the cost of averaging independent units to a 1 % relative standard error.

Parts (each prints a table):
  a  exact Tr(G) vs BackPACK DiagGGNExact with its converter: seconds and peak memory (child processes)
  b  seconds per pass and relative sd of one pass (over --probes passes) of every stochastic estimator, time
     to 1 %, vs PyHessian's Hutchinson (Hessian; = Tr(G) in expectation here: ReLU network in eval mode)
  c  curvlinops xtrace on its GGNLinearOperator: relative spread around exact over --repeats calls at each
     budget of --matvecs GGN-vector products; time to 1 % at the best budget (and, optimistically, assuming
     the spread falls as 1/products)
  d  the best stochastic estimator to 1 % vs exact (the goal is set with a 100-class head)
  u  unit costs interleaved (a ratio the load drifts less): one fisher_is pass vs one PyHessian probe (a
     Hessian-vector product) vs one GGN-vector product of the GGNLinearOperator (a product of --unit-columns
     columns at once, as in xtrace's two products), alternated --unit-repeats times
  e  one per-sample-norm pass by backend: layer rules (ghost/materialise chosen per layer, or forced),
     torch.func, BackPACK BatchL2Grad
A summary table closes (b)-(d): each estimator's time to 1 % and its ratio to PyHessian, xtrace and exact.

Run: .venv/bin/python bench/curvature.py [--width 16] [--samples 128] [--classes 10,100] [--parts abcde]
(the figures in theory/CURVATURE.md §7 give the exact commands; absolute seconds on a shared machine are noisy)
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


def memorise(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, target: float = 0.999
) -> tuple[nn.Module, int]:
    """Full-batch Adam until the mean top softmax probability (eval mode, calibrated BatchNorm) reaches
    ``target`` or ``steps`` steps are done; returns the network and the steps taken."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    step = 0
    while step < steps:
        step += 1
        net.train()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        calibrate(net, x)
        if top_prob(net, x) >= target:
            break
    return calibrate(net, x), step


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


def time_to_1pct(seconds: float, rel_sd: float) -> float:
    """Seconds to a 1 % relative standard error by averaging independent units (a pass, an xtrace call) that
    each take ``seconds`` with relative sd ``rel_sd``: seconds × (rel_sd / 1 %)², at least one unit."""
    return seconds * max((rel_sd / 0.01) ** 2, 1.0)


def rel_sd(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.stdev(values) / abs(mean) if mean != 0 else math.inf


def per_pass(net, x, y, method, probes, batch):
    r = ggn_trace(net, (x, y), method, num_probes=probes, generator=0, batch_size=batch)
    return r.seconds / probes, rel_sd(r.extra["probe_values"]), r.value


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
    return sec, rel_sd(values), statistics.fmean(values)


STOCHASTIC = ("fisher_is", "output_hutchinson", "fisher_mc", "hutchinson")


def part_b(nets, batch, probes, exact, pyhessian_probes, methods):
    """Per network: one row per stochastic estimator and PyHessian: (method, estimate, s/unit, rel sd, s to 1 %)."""
    print("\n(b) stochastic estimators: seconds a pass, relative sd of one pass (over the probes), "
          "time to 1 % = s/pass × (sd/1 %)²")  # fmt: skip
    print(f"{'network':<16} {'method':<18} {'estimate':>11} {'exact':>11} {'s/pass':>8} {'rel sd':>8} "
          f"{'s to 1 %':>10} {'vs PyHessian':>12}")  # fmt: skip
    rows = {}
    for name, (net, x, y) in nets.items():
        rows[name] = []
        for method in methods:
            sec, rsd, val = per_pass(net, x, y, method, probes, batch)
            rows[name].append((method, val, sec, rsd, time_to_1pct(sec, rsd)))
        if pyhessian_probes:
            sec, rsd, val = pyhessian_pass(net, x, y, pyhessian_probes, batch)
            rows[name].append(("PyHessian (H)", val, sec, rsd, time_to_1pct(sec, rsd)))
        ph = rows[name][-1][-1] if pyhessian_probes else math.nan
        for method, val, sec, rsd, t1 in rows[name]:
            print(f"{name:<16} {method:<18} {val:>11.5g} {exact[name][0]:>11.5g} {sec:>8.2f} {rsd:>8.2%} "
                  f"{t1:>10.1f} {ph / t1:>11.1f}x", flush=True)  # fmt: skip
    return rows


def part_c(nets, batch, matvecs, repeats, exact):
    """Per network: xtrace's time to 1 % (best over the budgets, each budget one unit) and its budget."""
    from curvlinops import GGNLinearOperator, xtrace

    print(f"\n(c) curvlinops xtrace on GGNLinearOperator: relative spread around exact over {repeats} repeats")
    print("    (seeds 0..), time to 1 % = s/call × (spread/1 %)²; last column: assuming spread ∝ 1/products instead")
    print(f"{'network':<16} {'products':>8} {'estimates (mean)':>16} {'rel spread':>10} {'s/call':>9} "
          f"{'s to 1 %':>10} {'(∝1/m)':>9}")  # fmt: skip
    best = {}
    for name, (net, x, y) in nets.items():
        params = [p for p in net.parameters() if p.requires_grad]
        data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
        op = GGNLinearOperator(net, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
        ex = exact[name][0]
        for m in matvecs:
            vals, start = [], time.perf_counter()
            for seed in range(repeats):
                with torch.random.fork_rng():  # xtrace draws from the global RNG
                    torch.manual_seed(seed)
                    vals.append(float(xtrace(op, m)))
            sec = (time.perf_counter() - start) / repeats
            spread = math.sqrt(statistics.fmean([(v - ex) ** 2 for v in vals])) / ex
            t1 = time_to_1pct(sec, spread)
            best[name] = min(best.get(name, (math.inf, 0)), (t1, m))
            print(f"{name:<16} {m:>8} {statistics.fmean(vals):>16.5g} {spread:>10.2%} {sec:>9.1f} {t1:>10.1f} "
                  f"{sec * max(spread / 0.01, 1.0):>9.1f}", flush=True)  # fmt: skip
    return best


def part_d(nets, batch, rows, exact, auto):
    print("\n(d) best stochastic estimator to 1 % vs exact (fisher_mc left out: its probe spread misses the rare")
    print("    large draws on a confident model, theory/CURVATURE.md §2)" + (
          "; and what ggn_trace(method='auto') does" if auto else ""))  # fmt: skip
    for name, (net, x, y) in nets.items():
        t1, method = min((r[4], r[0]) for r in rows[name] if r[0] in STOCHASTIC and r[0] != "fisher_mc")
        value, seconds = exact[name]
        print(f"{name}: exact {value:.5g} in {seconds:.1f} s; {method} to 1 % in {t1:.1f} s -> "
              f"{seconds / t1:.1f}x faster than exact", flush=True)  # fmt: skip
        if not auto:
            continue
        r = ggn_trace(net, (x, y), "auto", generator=0, batch_size=batch)
        print(f"  auto chose {r.method}: {r.value:.5g} ± {r.stderr or 0:.3g} in {r.seconds:.1f} s "
              f"({r.extra.get('auto')})", flush=True)  # fmt: skip


def summary(nets, rows, exact, xt):
    print("\nsummary: time to 1 % relative standard error, and how many times faster than each reference")
    print(f"{'network':<16} {'method':<18} {'s to 1 %':>9} {'vs PyHessian':>12} {'vs xtrace':>10} {'vs exact':>9}")
    for name in nets:
        ph = next((r[4] for r in rows[name] if r[0] == "PyHessian (H)"), math.nan)
        for method, _, _, _, t1 in rows[name]:
            vs_xt = f"{xt[name][0] / t1:>9.1f}x" if name in xt else f"{'-':>10}"
            print(f"{name:<16} {method:<18} {t1:>9.1f} {ph / t1:>11.1f}x {vs_xt} {exact[name][1] / t1:>8.1f}x")
        if name in xt:
            t1, m = xt[name]
            print(f"{name:<16} {'xtrace (' + str(m) + ')':<18} {t1:>9.1f} {ph / t1:>11.1f}x {1:>9.1f}x "
                  f"{exact[name][1] / t1:>8.1f}x")  # fmt: skip


def part_u(net, x, y, batch, columns, repeats):
    from curvlinops import GGNLinearOperator

    print(f"\n(u) unit costs, alternated {repeats} times: one fisher_is pass vs one PyHessian probe vs one "
          f"GGN-vector product (products of {columns} columns at once)")  # fmt: skip
    data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
    op = GGNLinearOperator(net, nn.CrossEntropyLoss(), list(net.parameters()), data, check_deterministic=False)
    op @ torch.ones(op.shape[1], 2)  # warm-up
    g = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        sec_pass = per_pass(net, x, y, "fisher_is", 2, batch)[0]
        sec_ph = pyhessian_pass(net, x, y, 2, batch)[0]
        start = time.perf_counter()
        op @ torch.randn(op.shape[1], columns, generator=g)
        sec_prod = (time.perf_counter() - start) / columns
        print(f"fisher_is {sec_pass:.2f} s/pass, PyHessian {sec_ph:.2f} s/probe, GGN product {sec_prod:.2f} s: "
              f"one PyHessian probe = {sec_ph / sec_pass:.2f} passes, one GGN product = {sec_prod / sec_pass:.2f} "
              "passes", flush=True)  # fmt: skip


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
    ap.add_argument("--probes", type=int, default=8, help="passes of each stochastic estimator (b)")
    ap.add_argument("--pyhessian-probes", type=int, default=4, help="0: no PyHessian")
    ap.add_argument("--methods", default=",".join(STOCHASTIC), help="the stochastic estimators of (b)")
    ap.add_argument("--auto", action="store_true", help="(d) also runs ggn_trace(method='auto')")
    ap.add_argument("--classes", default="10,100", help="heads of the networks of (b), (c), (d)")
    ap.add_argument("--nets", default="untrained,trained", help="networks of (b), (c), (d)")
    ap.add_argument("--xtrace-nets", default="untrained,trained", help="the networks (c) runs xtrace on")
    ap.add_argument("--train-steps", type=int, default=300, help="at most this many full-batch Adam steps")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--matvecs", default="6,24,48,96", help="xtrace budgets: GGN-vector products a call")
    ap.add_argument("--repeats", type=int, default=3, help="xtrace calls at each budget")
    ap.add_argument("--parts", default="abcdue")
    ap.add_argument("--unit-columns", type=int, default=24)
    ap.add_argument("--unit-repeats", type=int, default=2)
    ap.add_argument("--scaled-head", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args)
    print(f"CIFAR ResNet-18 width {args.width}, {args.samples} CIFAR-shaped samples, float32, eval mode, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")  # fmt: skip
    x, _ = make_data(args.samples, 10)
    nets = {}  # "<kind> C=<classes>" -> (net, x, y)
    if set(args.parts) & set("bcd"):
        for classes in [int(c) for c in args.classes.split(",")]:
            _, y = make_data(args.samples, classes)
            fresh = calibrate(make_net(classes, args.width), x)
            for kind in args.nets.split(","):
                if kind == "untrained":
                    net = fresh
                elif kind == "trained":
                    start = time.perf_counter()
                    net, steps = memorise(copy.deepcopy(fresh), x, y, args.train_steps, args.lr)
                    print(f"trained C={classes}: {steps} Adam steps (lr {args.lr:g}), "
                          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
                elif kind == "scaled":
                    net = scaled_head(fresh, x)
                else:
                    raise SystemExit(f"unknown network {kind!r}; valid: untrained, trained, scaled")
                nets[f"{kind} C={classes}"] = (net, x, y)
    exact = {}  # name -> (value, seconds)
    for name, (net, xs, ys) in nets.items():
        r = exact_ggn_trace(net, (xs, ys), batch_size=args.batch)
        exact[name] = (r.value, r.seconds)
        print(f"{name}: mean top softmax probability {top_prob(net, xs):.4f}; exact Tr(G) {r.value:.6g} "
              f"({r.seconds:.1f} s)", flush=True)  # fmt: skip
    if "a" in args.parts:
        part_a(args)
    rows = {}
    if set(args.parts) & set("bcd"):
        rows = part_b(nets, args.batch, args.probes, exact, args.pyhessian_probes, args.methods.split(","))
    xt = {}
    if "c" in args.parts:
        on = {n: v for n, v in nets.items() if n.split(" ")[0] in args.xtrace_nets.split(",")}
        xt = part_c(on, args.batch, [int(m) for m in args.matvecs.split(",")], args.repeats, exact)
    if "d" in args.parts:
        part_d(nets, args.batch, rows, exact, args.auto)
    if rows:
        summary(nets, rows, exact, xt)
    if "u" in args.parts:
        x10, y10 = make_data(args.samples, 10)
        part_u(calibrate(make_net(10, args.width), x10), x10, y10, args.batch, args.unit_columns, args.unit_repeats)
    if "e" in args.parts:
        x10, y10 = make_data(args.samples, 10)
        part_e(calibrate(make_net(10, args.width), x10), x10, y10, args.batch)


if __name__ == "__main__":
    main()
