"""Benchmark (b) of issue 15: Tr(G) of a GPT-style language model to a 1 % relative standard error, our
estimators vs curvlinops' xtrace on its GGNLinearOperator with the same loss, side by side in one run.

Text: the English of Python's standard library (``pydoc_data.topics.topics``, every topic in key order),
char-level (~100 symbols). Model: a 2-layer pre-norm causal GPT (``nn.TransformerEncoderLayer``, width 128,
4 heads, context 64, dropout 0, tied nothing), float32. Two regimes:

  (i)  trained on the text by minibatch Adam (random windows of the first 90 %), measured on 128 held-out
       sequences × 64 tokens (8,192 predictions): a model that generalises, not memorised;
  (ii) 16 sequences (distinct first characters) memorised (mean top probability >= 0.995) by full-batch Adam,
       from a fresh model (--memorise-from scratch, the default) or from the model of (i) (text).

G is the GGN of the mean token cross-entropy, (1/n) Σ_t J_tᵀ H_t J_t over the n predicted tokens, for every
method. curvlinops sees the model's output reshaped to (N·T, V) (a wrapper) and ``nn.CrossEntropyLoss()``
(reduction "mean"): the same G. Its products run in train mode (dropout 0, so the same function) under the
math attention kernel: in eval mode ``nn.TransformerEncoderLayer`` takes a fused path without forward-mode
derivative.

"Time to 1 %" is bench/curvature.py's: seconds a unit (a pass, an xtrace call) × (relative sd of one unit /
1 %)², at least one unit; for ``fisher_is_deflated`` the sketch (k GGN-vector products + k JVPs) is a fixed
cost added once. xtrace's relative spread is its root-mean-square error around the reference value over
--repeats calls (seeds 0..). The reference: ``fisher_is_deflated`` with --ref-rank over --ref-probes passes
(a fixed number; its standard error printed), or exact where --exact ran. "auto" is
``ggn_trace(..., "auto", target_rel_stderr=0.01)`` run as a user would, its wall time.

Parts (the models are trained once and cached in --cache): s (per-unit table of every estimator), x (xtrace),
u (interleaved unit costs: a fisher_is pass vs a GGN-vector product, and the ratio to 1 % they imply with the
spreads of s and x), a (auto and fisher_is_deflated run to 1 %), e (exact: run with --exact, else its cost
estimated from a fisher_is pass).

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/lm_trace.py [--regimes i,ii] [--parts sxuae] [--prefixes distinct|random]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmix_curvature.curvature import ggn_trace
from gmix_curvature.curvature.deflated import deflated_ggn_trace

warnings.filterwarnings("ignore")
CONTEXT = 64


def corpus() -> tuple[torch.Tensor, list[str]]:
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), chars


class GPT(nn.Module):
    """A pre-norm causal Transformer LM: token + learned position embeddings, ``layers`` encoder layers with a
    causal mask, a final LayerNorm and a linear head; (N, T) tokens -> (N, T, V) logits."""

    def __init__(self, vocab: int, width: int = 128, layers: int = 2, heads: int = 4, context: int = CONTEXT):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.blocks(self.tok(x) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(h))


class Flat(nn.Module):
    """The LM with its (N, T, V) logits as (N·T, V) rows, for curvlinops' CrossEntropyLoss."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lm(x)
        return out.reshape(-1, out.shape[-1])


def windows(tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.unsqueeze(1) + torch.arange(CONTEXT + 1)
    seq = tokens[idx]
    return seq[:, :-1], seq[:, 1:]


def lm_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def top_prob(net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.softmax(net.eval()(x), -1).amax(-1).mean())


def train_models(args: argparse.Namespace) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """{"i": (net, x, y), "ii": (net, x, y)}, trained (or loaded from --cache, keyed by the settings)."""
    tokens, chars = corpus()
    split = int(0.9 * len(tokens))
    g = torch.Generator().manual_seed(0)
    test_starts = split + torch.randint(0, len(tokens) - split - CONTEXT - 1, (args.sequences,), generator=g)
    xi, yi = windows(tokens, test_starts)
    # (ii): 16 training windows, with distinct first characters (every prefix unique, so every token can be
    # memorised) or at random (a few ambiguous tokens, e.g. a shared first character, stay uncertain)
    seen, starts = set(), []
    for s in torch.randint(0, split - CONTEXT - 1, (4096,), generator=g).tolist():
        if args.prefixes == "random" or int(tokens[s]) not in seen:
            seen.add(int(tokens[s]))
            starts.append(s)
        if len(starts) == args.memorised:
            break
    xm, ym = windows(tokens, torch.tensor(starts))
    cache_i = Path(args.cache) / f"gpt_w{args.width}_l{args.layers}_s{args.train_steps}.pt"
    cache_ii = cache_i.with_name(f"{cache_i.stem}_m{args.memorised}_{args.memorise_from}_{args.prefixes}.pt")
    cache_i.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net_i = GPT(len(chars), args.width, args.layers)
        torch.manual_seed(1)
        net_ii = GPT(len(chars), args.width, args.layers)
    if cache_i.exists():
        net_i.load_state_dict(torch.load(cache_i))
        print(f"(i) loaded from {cache_i}")
    else:
        start = time.perf_counter()
        opt = torch.optim.Adam(net_i.parameters(), lr=3e-3)
        for _ in range(args.train_steps):
            xb, yb = windows(tokens, torch.randint(0, split - CONTEXT - 1, (32,), generator=g))
            net_i.train()
            opt.zero_grad()
            lm_loss(net_i, xb, yb).backward()
            opt.step()
        print(f"(i) trained {args.train_steps} Adam steps of 32 windows in {time.perf_counter() - start:.0f} s")
        torch.save(net_i.state_dict(), cache_i)
    if cache_ii.exists():
        net_ii.load_state_dict(torch.load(cache_ii))
        print(f"(ii) loaded from {cache_ii}")
    else:
        if args.memorise_from == "text":
            net_ii.load_state_dict(net_i.state_dict())
        opt = torch.optim.Adam(net_ii.parameters(), lr=1e-3 if args.memorise_from == "text" else 3e-3)
        start, step = time.perf_counter(), 0
        while top_prob(net_ii, xm) < 0.995 and step < args.memorise_steps:
            step += 1
            net_ii.train()
            opt.zero_grad()
            lm_loss(net_ii, xm, ym).backward()
            opt.step()
        print(f"(ii) memorised ({args.prefixes} prefixes) from {args.memorise_from} in {step} full-batch Adam steps, "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        torch.save(net_ii.state_dict(), cache_ii)
    out = {"i": (net_i.eval(), xi, yi), "ii": (net_ii.eval(), xm, ym)}
    for name, (net, x, y) in out.items():
        with torch.no_grad():
            loss = float(lm_loss(net, x, y))
        print(f"regime ({name}): {x.shape[0]} sequences × {x.shape[1]} tokens, V = {len(chars)}, "
              f"{sum(p.numel() for p in net.parameters()):,} parameters; loss {loss:.3f}, mean top probability "
              f"{top_prob(net, x):.4f}")  # fmt: skip
    return out


def time_to_1pct(seconds: float, rel_sd: float, fixed: float = 0.0) -> float:
    """bench/curvature.py's convention: fixed + seconds a unit × (rel sd a unit / 1 %)², at least one unit."""
    return fixed + seconds * max((rel_sd / 0.01) ** 2, 1.0)


def rel_sd(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.stdev(values) / abs(mean) if mean != 0 else math.inf


def reference(net, x, y, args) -> tuple[float, float, float]:
    r = deflated_ggn_trace(net, (x, y), rank=args.ref_rank, generator=12345, num_probes=args.ref_probes,
                           batch_size=args.batch)  # fmt: skip
    return r.value, r.stderr, r.seconds


def part_s(net, x, y, args, ref) -> list[tuple]:
    """Rows (method, estimate, fixed s, s/unit, rel sd a unit, time to 1 %)."""
    rows = []
    print(f"{'method':<26} {'estimate':>10} {'fixed s':>8} {'s/unit':>8} {'rel sd':>8} {'s to 1 %':>9} "
          f"{'captured':>9}")  # fmt: skip
    for method in args.methods.split(","):
        try:
            if method.startswith("deflated"):
                k = int(method.split(":")[1]) if ":" in method else 16
                r = deflated_ggn_trace(net, (x, y), rank=k, num_probes=args.probes, generator=1, batch_size=args.batch)
                fixed = r.extra["sketch_seconds"] + r.extra["captured_seconds"]
                label, cap = f"fisher_is_deflated k={k}", f"{r.extra['captured_fraction']:.1%}"
            else:
                probes = args.hutchinson_probes if method == "hutchinson" else args.probes
                r = ggn_trace(net, (x, y), method, num_probes=probes, generator=1, batch_size=args.batch)
                fixed, label, cap = 0.0, method, ""
        except Exception as exc:  # a method that does not run on this model is reported, not fatal
            print(f"{method:<26} failed: {str(exc).splitlines()[0][:90]}")
            continue
        sec = (r.seconds - fixed) / r.n_probes
        rsd = rel_sd(r.extra["probe_values"])
        t1 = time_to_1pct(sec, rsd, fixed)
        rows.append((label, r.value, fixed, sec, rsd, t1))
        print(f"{label:<26} {r.value:>10.5g} {fixed:>8.2f} {sec:>8.2f} {rsd:>8.2%} {t1:>9.1f} {cap:>9}", flush=True)
    return rows


@contextlib.contextmanager
def math_attention():
    with sdpa_kernel(SDPBackend.MATH):
        yield


xtrace_rows: dict[str, list[tuple[int, float]]] = {}  # regime -> [(products, relative spread)]


def part_x(net, x, y, args, ref, name) -> tuple[float, int]:
    """xtrace at each budget: (best time to 1 %, its budget)."""
    from curvlinops import GGNLinearOperator, xtrace

    flat = Flat(net).train()  # dropout 0: the same function; train mode avoids the fused fast path
    params = [p for p in flat.parameters() if p.requires_grad]
    data = [(x[i : i + args.batch], y[i : i + args.batch].reshape(-1)) for i in range(0, len(y), args.batch)]
    best = (math.inf, 0)
    xtrace_rows[name] = []
    print(f"{'xtrace products':<26} {'mean':>10} {'rel spread':>10} {'sd/mean':>8} {'s/call':>8} {'s to 1 %':>9}")
    with math_attention():
        op = GGNLinearOperator(flat, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
        for m in [int(v) for v in args.matvecs.split(",")]:
            vals, start = [], time.perf_counter()
            for seed in range(args.repeats):
                with torch.random.fork_rng():  # xtrace draws from the global RNG
                    torch.manual_seed(seed)
                    vals.append(float(xtrace(op, m)))
            sec = (time.perf_counter() - start) / args.repeats
            spread = math.sqrt(statistics.fmean([(v - ref) ** 2 for v in vals])) / ref
            t1 = time_to_1pct(sec, spread)
            best = min(best, (t1, m))
            xtrace_rows[name].append((m, spread))
            sd = rel_sd(vals) if len(vals) > 1 else math.nan
            print(f"{'xtrace ' + str(m):<26} {statistics.fmean(vals):>10.5g} {spread:>10.2%} {sd:>8.2%} {sec:>8.1f} "
                  f"{t1:>9.1f}", flush=True)  # fmt: skip
    net.eval()
    return best


def part_u(net, x, y, args) -> float:
    """Interleaved unit costs (a ratio the load drifts less): one fisher_is pass (over all the data, its forward
    included) vs one GGN-vector product of curvlinops' operator (a product of --matvecs' first budget columns at
    once, as xtrace takes them), alternated --unit-repeats times; returns the median products a pass."""
    from curvlinops import GGNLinearOperator

    flat = Flat(net).train()
    params = [p for p in flat.parameters() if p.requires_grad]
    data = [(x[i : i + args.batch], y[i : i + args.batch].reshape(-1)) for i in range(0, len(y), args.batch)]
    columns = int(args.matvecs.split(",")[0])
    ratios = []
    with math_attention():
        op = GGNLinearOperator(flat, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
        g = torch.Generator().manual_seed(0)
        for rep in range(args.unit_repeats):
            r = ggn_trace(net.eval(), (x, y), "fisher_is", num_probes=2, generator=rep, batch_size=args.batch)
            sec_pass = r.seconds / 2
            flat.train()
            start = time.perf_counter()
            op @ torch.randn(op.shape[1], columns, generator=g)
            sec_prod = (time.perf_counter() - start) / columns
            ratios.append(sec_pass / sec_prod)
            print(f"fisher_is {sec_pass:.2f} s a pass, GGN product {sec_prod:.2f} s: one pass = "
                  f"{sec_pass / sec_prod:.2f} products", flush=True)  # fmt: skip
    net.eval()
    return statistics.median(ratios)


def part_a(net, x, y, args, ref) -> dict[str, float]:
    out = {}
    for label, fn in (("auto", lambda: ggn_trace(net, (x, y), "auto", generator=2, target_rel_stderr=0.01,
                                                   batch_size=args.batch)),
                      (f"fisher_is_deflated k={args.rank}", lambda: deflated_ggn_trace(
                          net, (x, y), rank=args.rank, generator=2, target_rel_stderr=0.01, batch_size=args.batch))):
        try:
            r = fn()
        except Exception as exc:
            print(f"{label} to 1 %: failed: {str(exc).splitlines()[0][:100]}")
            continue
        out[label] = r.seconds
        note = r.extra.get("auto", "")
        print(f"{label} to 1 %: {r.method} {r.value:.5g} ± {r.stderr or 0:.3g} ({(r.rel_stderr or 0):.2%}; "
              f"{(r.value - ref) / ref:+.2%} from the reference) in {r.seconds:.1f} s, {r.n_probes} passes"
              f"{'; ' + note if note else ''}", flush=True)  # fmt: skip
    return out


def part_e(net, x, y, args, name, rows) -> float | None:
    """exact (one per-sample-norm pass per position and class) where --exact names the regime, else its cost
    estimated from the seconds of a fisher_is pass of part s."""
    from gmix_curvature.curvature import exact_ggn_trace

    passes = y.shape[1] * net.head.out_features  # over the data, each as costly as a fisher_is pass
    if name not in args.exact.split(","):
        sec = next((r[3] for r in rows if r[0] == "fisher_is"), math.nan)
        print(f"exact: not run; {passes} per-sample-norm passes over the data (one per position and class), about "
              f"{passes * sec:.0f} s at {sec:.2f} s a fisher_is pass")  # fmt: skip
        return None
    r = exact_ggn_trace(net, (x, y), batch_size=args.batch)
    print(f"exact: {r.value:.6g} in {r.seconds:.1f} s", flush=True)
    return r.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="i,ii")
    ap.add_argument("--parts", default="sxuae")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=128, help="held-out sequences of regime (i) (regime (ii)'s "
                    "windows are drawn after them from the same generator: measure (ii) with the default)")
    ap.add_argument("--memorised", type=int, default=16, help="sequences of regime (ii)")
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--memorise-from", choices=("scratch", "text"), default="scratch",
                    help="regime (ii) trains a fresh model on its 16 sequences, or the model of (i) further")
    ap.add_argument("--prefixes", choices=("distinct", "random"), default="distinct",
                    help="regime (ii)'s windows: distinct first characters, or at random (ambiguous tokens)")
    ap.add_argument("--memorise-steps", type=int, default=3000, help="at most this many full-batch steps (ii)")
    ap.add_argument("--batch", type=int, default=32, help="sequences a batch (every method)")
    ap.add_argument("--methods", default="fisher_is,deflated:0,deflated:8,deflated:16,deflated:32,hutchinson")
    ap.add_argument("--probes", type=int, default=8, help="passes of each per-sample-norm estimator")
    ap.add_argument("--hutchinson-probes", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16, help="k of the fisher_is_deflated run to 1 % (part a)")
    ap.add_argument("--matvecs", default="24")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unit-repeats", type=int, default=3)
    ap.add_argument("--ref-rank", type=int, default=32)
    ap.add_argument("--ref-probes", type=int, default=100, help="passes of the reference (a fixed number: an "
                    "adaptive stop biases a skewed estimator)")
    ap.add_argument("--exact", default="", help="regimes to run exact on (e.g. ii)")
    ap.add_argument("--cache", default="/tmp/gmix_lm_trace_cache")
    args = ap.parse_args()
    print(f"bench/lm_trace.py: {torch.get_num_threads()} threads, {os.cpu_count()} cores, float32, torch "
          f"{torch.__version__}")  # fmt: skip
    models = train_models(args)
    summary = []
    for name in args.regimes.split(","):
        net, x, y = models[name]
        print(f"\n=== regime ({name}) ===")
        truth = part_e(net, x, y, args, name, []) if name in args.exact.split(",") else None
        ref, ref_se, ref_sec = reference(net, x, y, args)
        print(f"reference (fisher_is_deflated k={args.ref_rank}, {args.ref_probes} passes): {ref:.6g} ± {ref_se:.3g} "
              f"({ref_sec:.0f} s)" + (f"; exact {truth:.6g}" if truth is not None else ""), flush=True)  # fmt: skip
        ref = truth if truth is not None else ref
        rows = part_s(net, x, y, args, ref) if "s" in args.parts else []
        if "e" in args.parts and truth is None:
            part_e(net, x, y, args, name, rows)
        xt = part_x(net, x, y, args, ref, name) if "x" in args.parts else (math.nan, 0)
        unit = part_u(net, x, y, args) if "u" in args.parts else math.nan
        direct = part_a(net, x, y, args, ref) if "a" in args.parts else {}
        summary.append((name, rows, xt, direct, unit))
    print("\nsummary: time to 1 % (s) and how many times faster than xtrace (its best budget), one run")
    for name, rows, (xt1, m), direct, unit in summary:
        print(f"({name}) xtrace ({m} products): {xt1:.1f} s")
        if not math.isnan(unit):
            spread = next((r for r in xtrace_rows.get(name, []) if r[0] == m), None)
            fis = next((r for r in rows if r[0] == "fisher_is"), None)
            if spread and fis:
                xt_products = m * max((spread[1] / 0.01) ** 2, 1.0)
                fis_passes = max((fis[4] / 0.01) ** 2, 1.0)
                print(f"({name}) interleaved units: one fisher_is pass = {unit:.2f} GGN products; to 1 %: xtrace "
                      f"{xt_products:.0f} products, fisher_is {fis_passes:.1f} passes = {fis_passes * unit:.1f} "
                      f"products -> {xt_products / (fis_passes * unit):.1f}x")  # fmt: skip
        for label, _, _, _, _, t1 in rows:
            print(f"({name}) {label:<26} {t1:>8.1f} s  {xt1 / t1:>7.1f}x")
        for label, sec in direct.items():
            print(f"({name}) {label + ' (run to 1 %)':<26} {sec:>8.1f} s  {xt1 / sec:>7.1f}x")


if __name__ == "__main__":
    main()
