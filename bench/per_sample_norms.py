"""One per-sample-norm pass against one plain forward+backward of the same batch (issue 15, benchmark (a)).

A pass is what every per-sample-norm estimator repeats: ``PerSampleNorms.forward(x)`` and one
``norms(v)`` (per-sample squared norms ‖∂⟨f_i, v_i⟩/∂θ_l‖² of every parameter tensor, v of the output's
shape). The floor is about one forward+backward (1×); the goals are ≤ 2.5× the time and ≤ 2× the peak memory.
Each (model, method) runs in a FRESH process: one warm-up pass, then ``--reps`` timed passes (the fastest:
the machine is shared; the median is in the JSON line), and
the process's peak resident set size (VmHWM, torch itself included, the same for every method) — the goal's
measure — beside the peak above the resident size before the first pass ("extra": what the pass adds to
torch, the model and the batch).

Methods: ``plain`` (forward, ``(f·v).sum().backward()``: the parameter gradients), ``rules`` (the default
``backend="auto"``: per-layer rules + module-local fallback), ``func`` (the whole-model torch.func path),
``backpack`` (BackPACK's BatchL2Grad, converter on), ``opacus`` (Opacus' ghost clipping,
``GradSampleModuleFastGradientClipping``, its per-sample norms after one backward). A method that refuses a
model is reported with its one-line error.

Models (float32, eval mode, CPU): the CIFAR ResNet-18 (width 64), a ViT (torchvision's, 6 layers, width 384,
32×32 images, patch 4), a GPT-style LM (6 pre-norm ``nn.TransformerEncoderLayer``, width 384, context 128,
vocabulary 8192, tied input/output embedding), the same LM with hand-written attention and an untied head
(``gpt_hand``: the layout Opacus can take), and the Fig. 3 Transformer at base size (d_model 512, 6+6 layers,
vocabulary 10,000, 32 tokens).

    python bench/per_sample_norms.py [--models resnet18 vit gpt gpt_hand fig3] [--methods ...] [--reps 3]
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
from torch import nn

MODELS = ("resnet18", "vit", "gpt", "gpt_hand", "fig3")
METHODS = ("plain", "rules", "func", "backpack", "opacus")
BATCH = {"resnet18": 32, "vit": 32, "gpt": 8, "gpt_hand": 8, "fig3": 8}


class GPT(nn.Module):
    """Decoder-only LM: token + learned position embedding, pre-norm nn.TransformerEncoderLayer blocks with a
    causal mask, final LayerNorm, output projection tied to the token embedding."""

    def __init__(self, vocab: int = 8192, d: int = 384, layers: int = 6, heads: int = 6, context: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).unsqueeze(0))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.head(self.ln(self.blocks(h, mask=mask, is_causal=True)))


class HandBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        h = h + self.proj(a)
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class HandGPT(nn.Module):
    """The GPT above with hand-written attention (Linear q/k/v) and an untied head; positions per sample."""

    def __init__(self, vocab: int = 8192, d: int = 384, layers: int = 6, heads: int = 6, context: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[HandBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(pos))))


def build(name: str, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """(model in eval mode, batch) for one benchmark model, float32, seeded."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        from gmix_curvature.models import CifarResNet18

        return CifarResNet18(10, width=64).eval(), torch.randn(batch, 3, 32, 32, generator=g)
    if name == "vit":
        from torchvision.models import VisionTransformer

        model = VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=6, hidden_dim=384,
                                  mlp_dim=1536, num_classes=10)  # fmt: skip
        return model.eval(), torch.randn(batch, 3, 32, 32, generator=g)
    if name in ("gpt", "gpt_hand"):
        model = GPT() if name == "gpt" else HandGPT()
        return model.eval(), torch.randint(0, 8192, (batch, 128), generator=g)
    if name == "fig3":
        from gmix_curvature.transformer import TransformerSeq2Seq

        model = TransformerSeq2Seq(10_000, max_len=32, dropout=0.0)
        return model.eval(), torch.randint(1, 10_000, (batch, 2, 32), generator=g)
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")


def make_pass(name: str, method: str, batch: int):
    """A closure running one pass of ``method`` on ``name`` (built here, in this process)."""
    model, x = build(name, batch)
    with torch.no_grad():
        shape = model(x[:1]).shape[1:]
    v = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    params = dict(model.named_parameters())
    if method == "plain":

        def run():
            model.zero_grad(set_to_none=True)
            (model(x) * v).sum().backward()

    elif method in ("rules", "func"):
        from gmix_curvature.curvature._norms import PerSampleNorms

        psn = PerSampleNorms(model, params, "auto" if method == "rules" else "func")

        def run():
            psn.forward(x)
            psn.norms(v)
            if method == "rules" and psn.backend != "hooks":
                raise RuntimeError(f"auto took torch.func: {psn.reason}")

    elif method == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        model = extend(model, use_converter=True)

        def run():
            model.zero_grad(set_to_none=True)
            with backpack(BatchL2Grad()):
                (model(x) * v).sum().backward()
            return [p.batch_l2 for p in model.parameters()]

    elif method == "opacus":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        model.train()  # Opacus records activations in train mode only (every model here has dropout 0)
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", strict=False,
                                                   use_ghost_clipping=True)  # fmt: skip

        def run():
            gsm.zero_grad(set_to_none=True)
            (gsm(x) * v).sum().backward()
            return gsm.get_norm_sample()

    else:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return run


def _status_mb(field: str) -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) / 1024


def measure(name: str, method: str, batch: int, reps: int) -> dict:
    """In this process: one warm-up pass, ``reps`` timed passes; median seconds, peak resident MB (VmHWM) and
    the peak above the resident size before the first pass (torch, the model and the batch already there)."""
    try:
        run = make_pass(name, method, batch)
        before = _status_mb("VmRSS")
        run()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    except Exception as exc:  # a method refusing a model is a result of the benchmark
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"}
    peak = _status_mb("VmHWM")
    # the fastest pass: on a shared machine the others carry the neighbours' load (the median is kept too)
    return {"seconds": min(times), "median_s": statistics.median(times), "peak_mb": peak, "extra_mb": peak - before}


def fresh(name: str, method: str, batch: int, reps: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, 'bench'); from per_sample_norms import measure;"
            f"print(json.dumps(measure({name!r}, {method!r}, {batch}, {reps})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": f"exit {out.returncode}: {tail[:150]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=None, help="one batch size for every model (default: per model)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, float32, fastest of {args.reps} timed "
          "passes, each method in a fresh process")  # fmt: skip
    print(f"{'model':9s} {'batch':>5s} {'method':9s} {'s/pass':>8s} {'× plain':>8s} {'peak MB':>8s} {'× plain':>8s} "
          f"{'extra MB':>9s} {'× plain':>8s}")  # fmt: skip
    results: dict = {}
    for name in args.models:
        batch = args.batch or BATCH[name]
        rows = results[name] = {}
        for method in methods:
            r = rows[method] = fresh(name, method, batch, args.reps)
            base = rows["plain"]
            if "error" in r:
                print(f"{name:9s} {batch:5d} {method:9s} {r['error']}", flush=True)
                continue
            if "error" not in base:
                r["time_ratio"] = r["seconds"] / base["seconds"]
                r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
                r["extra_ratio"] = r["extra_mb"] / max(base["extra_mb"], 1.0)
            nan = float("nan")
            print(f"{name:9s} {batch:5d} {method:9s} {r['seconds']:8.3f} {r.get('time_ratio', nan):8.2f} "
                  f"{r['peak_mb']:8.0f} {r.get('memory_ratio', nan):8.2f} {r['extra_mb']:9.0f} "
                  f"{r.get('extra_ratio', nan):8.2f}", flush=True)  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
