"""Per-layer rules (the hooks backend of PerSampleNorms) == the whole-model torch.func path, float64.

Cases are data: a model factory, a batch factory, an output adapter, and the route every module owning
parameters must take (so that a regression to the module-local fallback, or to the whole-model path, fails).
Each case draws one output-space vector v of the output's shape, so sequence outputs carry the cross terms
between positions that the norm of a sample's summed gradient must include.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from gmix_curvature.curvature._norms import PerSampleNorms, supports_hooks
from gmix_curvature.errors import GmixError
from gmix_curvature.transformer import TransformerSeq2Seq

RTOL = 1e-10  # relative, per parameter; float64 rounding of the two paths' different summation orders


@dataclass(frozen=True)
class NormCase:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    routes: dict[str, str] = field(default_factory=dict)  # module name -> route it must take
    fallbacks: int = 0  # how many modules may take the module-local fallback
    output_fn: Callable[[Any], torch.Tensor] | None = None
    trained: bool = False  # trained to predict the next token with confidence (mean top probability >= 0.9)


# --- models ---------------------------------------------------------------------------------------
class CausalLM(nn.Module):
    """Embedding (padding 0) -> one post-norm nn.TransformerEncoderLayer (causal mask, key padding) -> head."""

    def __init__(self, vocab: int = 13, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(6, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.embed(ids) + self.pos(torch.arange(t).unsqueeze(0))  # positions: a batch of 1, broadcast
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.bool)
        return self.head(self.layer(h, src_mask=mask, src_key_padding_mask=ids == 0, is_causal=True))


class CrossAttention(nn.Module):
    """Cross-attention with key/value widths of their own (separate q/k/v weights), a float (L, S) mask
    and a boolean key padding mask; the query and the memory are two halves of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = nn.Linear(4, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)
        self.query = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, mem = self.query(x[:, :3]), self.memory(x[:, 3:])
        mask = torch.tensor([[0.0, -1.0, 0.5, 0.0], [0.2, 0.0, -0.3, 0.0], [0.0, 0.0, 0.0, -2.0]], dtype=x.dtype)
        pad = x[:, 3:, 0] > 1.2  # some memory positions ignored, data-dependent
        pad[:, 0] = False
        h, _ = self.attn(q, mem, mem[..., :5], key_padding_mask=pad, attn_mask=mask)
        return self.out(h)


class Scaled(nn.Module):
    """A custom layer: no rule knows it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.3, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.gamma) + self.shift**2


class Block(nn.Module):
    """A non-leaf module with a parameter of its own (a layer scale) around a Linear child."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.linspace(0.1, 0.9, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.tanh(self.fc(x))


class BarePositionLM(nn.Module):
    """A GPT-style LM whose position embedding is a bare parameter of the model, ``x + self.pos[:t]`` (as in
    bench/lm_trace.py and much hand-written code): a direct use, no module-local fallback on the whole model."""

    def __init__(self, vocab: int = 13, d: int = 8, context: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=self.pos.dtype)
        return self.head(self.layer(self.embed(ids) + self.pos[:t], src_mask=mask, is_causal=True))


class TimmStyleViT(nn.Module):
    """timm's layout: class token and position embedding are parameters of the model itself, used in its own
    forward (``cls_token.expand(n, -1, -1)``, ``x + pos_embed``), a bias used twice, and a temperature used
    through ``exp`` (neither of the last two is direct: they keep the fallback on the model)."""

    def __init__(self, d: int = 8, patches: int = 4, classes: int = 5, extra: bool = False) -> None:
        super().__init__()
        self.extra = extra
        self.patch = nn.Linear(12, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, d) * 0.1)
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, classes)
        if extra:
            self.twice = nn.Parameter(torch.linspace(-0.3, 0.3, d))
            self.log_temp = nn.Parameter(torch.tensor(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x.reshape(x.shape[0], -1, 12))
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
        h = self.block(h)
        if self.extra:
            h = torch.tanh(h + self.twice) + self.twice
            h = h * self.log_temp.exp()
        return self.head(h[:, 0])


def _conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(),
        nn.Conv1d(4, 4, 4, padding="same", dilation=2, groups=2, bias=False), nn.Tanh(),
        nn.Conv1d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(12, 5),
    )  # fmt: skip


def _group_norm_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 6, 3, stride=2), nn.GroupNorm(3, 6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )  # fmt: skip


def _layer_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 6), nn.RMSNorm(6),
                         nn.Linear(6, 4))  # fmt: skip


class EmbeddingLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 6, padding_idx=0)
        self.fc = nn.Linear(6, 9)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.embed(ids)))


def _seq2seq() -> nn.Module:
    return TransformerSeq2Seq(11, max_len=6, d_model=8, nhead=2, num_layers=1, dim_feedforward=16, dropout=0.0)


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=10)  # fmt: skip


def _convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5)


def _swin() -> nn.Module:
    """Its attention calls F.linear on its children's weights: the fallback takes the attention module whole."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 8, [1, 1], [1, 2], [2, 2], num_classes=5)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=2)  # fmt: skip
    return BertForMaskedLM(cfg)


def _custom() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), Scaled(6), Block(6), nn.Linear(6, 3))


def _conv3d_net() -> nn.Module:
    """No rule for Conv3d: the module-local fallback."""
    return nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 27, 4))


# --- batches --------------------------------------------------------------------------------------
def _ids(g: torch.Generator, n: int, t: int, vocab: int, pad: bool = True) -> torch.Tensor:
    ids = torch.randint(1, 4, (n, t), generator=g)  # few distinct tokens: repeats within a sample
    ids[:, ::2] = torch.randint(1, vocab, (n, (t + 1) // 2), generator=g)
    if pad:
        ids[0, -2:] = 0
        ids[1, -1:] = 0
    return ids


def _hf_batch(vocab: int) -> Callable[[torch.Generator], dict]:
    def batch(g: torch.Generator) -> dict:
        ids = _ids(g, 3, 7, vocab, pad=False)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return batch


def _seq2seq_batch(g: torch.Generator) -> torch.Tensor:
    src, tgt = _ids(g, 3, 6, 11), _ids(g, 3, 6, 11)
    tgt[2, 1] = src[2, 0]  # a token shared by source and target of one sample: cross term of the tied weight
    return torch.stack([src, tgt], 1)


def _logits(o: Any) -> torch.Tensor:
    return o.logits


LINEAR, CONV, MHA = "rule:linear", "rule:conv", "rule:multihead_attention"
CASES = [
    NormCase("conv1d", _conv1d_net, lambda g: torch.randn(4, 2, 10, generator=g, dtype=torch.float64),
             {"0": CONV, "2": CONV, "4": CONV, "6": LINEAR}),
    NormCase("group_norm", _group_norm_net, lambda g: torch.randn(4, 3, 9, 9, generator=g, dtype=torch.float64),
             {"0": CONV, "1": "rule:group_norm", "4": "rule:group_norm", "7": LINEAR}),
    NormCase("layer_norm_mlp", _layer_norm_mlp, lambda g: torch.randn(4, 5, 5, generator=g, dtype=torch.float64),
             {"0": LINEAR, "1": "rule:layer_norm", "4": "rule:rms_norm", "5": LINEAR}),
    NormCase("embedding_lm", EmbeddingLM, lambda g: _ids(g, 4, 7, 9), {"embed": "rule:embedding", "fc": LINEAR}),
    NormCase("encoder_lm", CausalLM, lambda g: _ids(g, 4, 6, 13),
             {"embed": "rule:embedding", "pos": "rule:embedding", "layer.self_attn": MHA,
              "layer.linear1": LINEAR, "layer.norm1": "rule:layer_norm", "head": LINEAR}),
    NormCase("encoder_lm_trained", CausalLM, lambda g: _ids(g, 4, 6, 13), {"layer.self_attn": MHA}, trained=True),
    NormCase("seq2seq_tied", _seq2seq, _seq2seq_batch,
             {"embed": "rule:embedding", "out": LINEAR, "encoder.layers.0.self_attn": MHA,
              "decoder.layers.0.multihead_attn": MHA, "decoder.layers.0.norm3": "rule:layer_norm"}),
    NormCase("vit", _vit, lambda g: torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64),
             {"class_token": "direct", "encoder.pos_embedding": "direct", "conv_proj": CONV,
              "encoder.layers.encoder_layer_0.self_attention": MHA, "encoder.ln": "rule:layer_norm",
              "heads.head": LINEAR}),
    NormCase("convnext", _convnext, lambda g: torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64),
             {"features.1.0.layer_scale": "direct", "features.0.0": CONV, "features.0.1": "rule:layer_norm_2d",
              "features.1.0.block.2": "rule:layer_norm", "features.1.0.block.3": LINEAR}),
    NormCase("bare_position_lm", BarePositionLM, lambda g: _ids(g, 4, 6, 13),
             {"pos": "direct", "embed": "rule:embedding", "layer.self_attn": MHA, "head": LINEAR}),
    NormCase("bare_position_lm_trained", BarePositionLM, lambda g: _ids(g, 4, 6, 13), {"pos": "direct"},
             trained=True),
    NormCase("timm_style_vit", TimmStyleViT, lambda g: torch.randn(3, 4, 12, generator=g, dtype=torch.float64),
             {"cls_token": "direct", "pos_embed": "direct", "patch": LINEAR, "block.self_attn": MHA}),
    NormCase("timm_style_vit_other_uses", lambda: TimmStyleViT(extra=True),
             lambda g: torch.randn(3, 4, 12, generator=g, dtype=torch.float64),
             {"cls_token": "direct", "pos_embed": "direct", "": "fallback"}, fallbacks=1),
    NormCase("swin", _swin, lambda g: torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64),
             {"features.1.0.attn": "fallback", "features.3.0.attn": "fallback", "features.1.0.mlp.0": LINEAR,
              "features.1.0.norm1": "rule:layer_norm", "features.2.reduction": LINEAR}, fallbacks=2),
    NormCase("gpt2", _gpt2, _hf_batch(50), {"transformer.wte": "rule:embedding", "transformer.wpe": "rule:embedding",
             "transformer.h.0.attn.c_attn": "rule:hf_conv1d", "transformer.ln_f": "rule:layer_norm"},
             output_fn=_logits),
    NormCase("bert", _bert, _hf_batch(40), {"bert.embeddings.word_embeddings": "rule:embedding",
             "bert.encoder.layer.0.attention.self.query": LINEAR, "cls.predictions.decoder": LINEAR},
             output_fn=_logits),
    NormCase("cross_attention", CrossAttention, lambda g: torch.randn(4, 7, 4, generator=g, dtype=torch.float64),
             {"attn": MHA, "query": LINEAR, "memory": LINEAR}),
    NormCase("conv3d", _conv3d_net, lambda g: torch.randn(3, 2, 4, 4, 4, generator=g, dtype=torch.float64),
             {"0": "fallback", "3": LINEAR}, fallbacks=1),
    NormCase("custom_layer", _custom, lambda g: torch.randn(4, 4, generator=g, dtype=torch.float64),
             {"0": LINEAR, "1": "fallback", "2.scale": "direct", "2.fc": LINEAR, "3": LINEAR}, fallbacks=1),
]  # fmt: skip


def _materialise(case: NormCase) -> tuple[nn.Module, Any, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(0)
    state = torch.random.get_rng_state()
    try:
        torch.random.manual_seed(0)  # nn.Module initialisers draw from the global RNG
        model = case.build().double().eval()
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():  # non-trivial norm affines and biases (LayerNorm starts at 1 and 0)
        for name, p in model.named_parameters():
            if p.dim() <= 1 or "token" in name or "pos" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = case.batch(g)
    if case.trained:
        _train_next_token(model, x)
    params = dict(model.named_parameters())
    return model, x, g, params


def _train_next_token(model: nn.Module, ids: torch.Tensor) -> None:
    """Adam until the mean top probability of the next token (where there is one) reaches 0.9 (some contexts
    are ambiguous in this batch: the same prefix, two next tokens)."""
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    target = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    keep = (ids != 0) & (target != 0)
    for _ in range(500):
        logits = model(ids)
        if torch.softmax(logits[keep], -1).max(-1).values.mean() >= 0.9:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(logits[keep], target[keep]).backward()
        opt.step()
    assert torch.softmax(model(ids)[keep], -1).max(-1).values.mean() >= 0.9
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rules_match_whole_model_func(case: NormCase) -> None:
    model, x, g, params = _materialise(case)
    model.eval()
    hooks = PerSampleNorms(model, params, "auto", output_fn=case.output_fn)
    out = hooks.forward(x)
    assert hooks.backend == "hooks", hooks.reason
    for name, route in case.routes.items():
        assert hooks.routes.get(name) == route, (name, hooks.routes.get(name))
    assert sum(r == "fallback" for r in hooks.routes.values()) == case.fallbacks, hooks.routes
    ref = PerSampleNorms(model, params, "func", output_fn=case.output_fn)
    torch.testing.assert_close(ref.forward(x), out, rtol=1e-12, atol=1e-12)
    for _ in range(3):  # three vectors on one forward pass: the rules keep their inputs' part from the second on
        v = torch.randn(out.shape, generator=g, dtype=out.dtype)
        got, want = hooks.norms(v), ref.norms(v)
        assert set(got) == set(want) == set(params)
        scale = max(float(w.max()) for w in want.values())
        for name in params:
            torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=RTOL * scale, msg=name)
    kept = {key for rec, *_ in hooks._records for key in rec.cache}
    if MHA in case.routes.values():  # the attention's recomputation kept: its cached path ran on the third vector
        assert "attention" in kept


def test_tied_weight_includes_cross_terms() -> None:
    """The tied embedding/output weight of the seq2seq model: the per-use norms alone miss 2⟨G^(1), G^(2)⟩."""
    case = next(c for c in CASES if c.name == "seq2seq_tied")
    model, x, g, params = _materialise(case)
    psn = PerSampleNorms(model, params)
    out = psn.forward(x)
    uses = [rec for rec, _, _, local in psn._records if "embed.weight" in local.values()]
    assert len(uses) == 3  # the source embedding, the target embedding, the output projection
    v = torch.randn(out.shape, generator=g, dtype=out.dtype)
    tied = psn.norms(v)["embed.weight"]
    separate = sum(rule.norms(rec)["weight"] for rec, _, rule, local in psn._records
                   if "embed.weight" in local.values())  # fmt: skip
    assert not torch.allclose(tied, separate, rtol=1e-3)


class StrayUse(nn.Module):
    """Ties the output to the embedding by reading its weight outside the embedding's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(self.embed(ids)), self.embed.weight)


def test_stray_parameter_use_leaves_the_hooks() -> None:
    model = StrayUse().double()
    params = dict(model.named_parameters())
    ids = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(0))
    psn = PerSampleNorms(model, params)
    out = psn.forward(ids)
    assert psn.backend == "func" and "embed.weight" in psn.reason
    v = torch.randn(out.shape, dtype=out.dtype)
    want = PerSampleNorms(model, params, "func")
    want.forward(ids)
    torch.testing.assert_close(psn.norms(v)["embed.weight"], want.norms(v)["embed.weight"], rtol=1e-12, atol=0)
    with pytest.raises(GmixError, match="used outside the forward of the module owning it"):
        PerSampleNorms(model, params, "hooks").forward(ids)


class InPlaceAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2.0
        out = self.fc(h)
        h.add_(1.0)  # the Linear's input changes after the Linear ran (autograd saved nothing to check)
        return out + h


def test_input_modified_in_place_is_refused() -> None:
    model = InPlaceAfter().double()
    psn = PerSampleNorms(model, dict(model.named_parameters()))
    out = psn.forward(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(GmixError, match="input of module 'fc' was modified in place"):
        psn.norms(torch.ones_like(out))


class RecurrentLM(nn.Module):
    """nn.LSTM returns its states (layers, N, H) beside the outputs: the model takes torch.func, which vmap
    refuses (no batching rule), so the func backend goes one sample at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(7, 4), nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def test_recurrent_model_takes_func_one_sample_at_a_time() -> None:
    model = RecurrentLM().double()
    params = dict(model.named_parameters())
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))
    psn = PerSampleNorms(model, params)
    out = psn.forward(ids)
    assert psn.backend == "func" and "computes a batch of 1" in psn.reason
    v = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got = psn.norms(v)
    for i in range(3):
        grads = torch.autograd.grad((model(ids[i : i + 1]) * v[i : i + 1]).sum(), list(params.values()))
        for name, grad in zip(params, grads):
            assert float(got[name][i]) == pytest.approx(float(grad.square().sum()), rel=1e-10)


def test_sequence_first_model_takes_func() -> None:
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False
    params = dict(model.named_parameters())
    assert not supports_hooks(model, params)
    assert PerSampleNorms(model, params).backend == "func"
    with pytest.raises(GmixError, match="sequence-first"):
        PerSampleNorms(model, params, "hooks")


def test_v_of_another_shape_is_refused() -> None:
    model = nn.Linear(3, 2)
    psn = PerSampleNorms(model, dict(model.named_parameters()))
    psn.forward(torch.randn(4, 3))
    with pytest.raises(GmixError, match=r"v has shape \(4, 3\)"):
        psn.norms(torch.randn(4, 3))


def test_embedding_padding_rows_get_no_gradient() -> None:
    """A sample of padding only has zero embedding norm; per-sample norms equal a per-sample loop."""
    model = EmbeddingLM().double()
    ids = torch.tensor([[0, 0, 0], [3, 3, 0], [1, 2, 1]])
    psn = PerSampleNorms(model, dict(model.named_parameters()))
    out = psn.forward(ids)
    v = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    got = psn.norms(v)["embed.weight"]
    for i in range(3):
        (grad,) = torch.autograd.grad((model(ids[i : i + 1]) * v[i : i + 1]).sum(), [model.embed.weight])
        assert float(got[i]) == pytest.approx(float(grad.square().sum()), rel=1e-12, abs=1e-300)
    assert float(got[0]) == 0.0 and math.isfinite(float(got[2]))


class HandAttentionLM(nn.Module):
    """A one-block LM with hand-written attention (Linear q/k/v): the layout Opacus' ghost clipping takes."""

    def __init__(self, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(6, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.fc = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.head = nn.Linear(2 * d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(t).repeat(n, 1))
        q, k, v = self.qkv(self.ln1(h)).view(n, t, 3, 2, -1).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, -1)
        h = h + self.proj(a)
        return self.head(torch.tanh(self.fc(self.ln2(h))))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_total_norms_match_opacus_ghost_clipping() -> None:
    """Opacus' per-sample gradient norms (GradSampleModuleFastGradientClipping, sum reduction) == ours."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    state = torch.random.get_rng_state()
    try:
        torch.random.manual_seed(0)
        model = HandAttentionLM().double()
    finally:
        torch.random.set_rng_state(state)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (3, 6), generator=g)
    psn = PerSampleNorms(model, dict(model.named_parameters()))
    out = psn.forward(ids)
    assert "fallback" not in psn.routes.values()
    v = torch.randn(out.shape, generator=g, dtype=out.dtype)
    ours = torch.stack(list(psn.norms(v).values())).sum(0).sqrt()
    model.train()  # Opacus records activations in train mode only (no dropout here)
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", strict=False)
    (gsm(ids) * v).sum().backward()
    torch.testing.assert_close(ours, gsm.get_norm_sample(), rtol=1e-12, atol=0)


def test_vit_tokens_through_the_module_local_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the detection of direct uses off, the class token (owned by the model itself) and the position
    embedding (owned by the encoder) go through the fallback on their modules, with only those parameters
    substituted, and still equal the whole-model path (the vit case above takes them as direct uses)."""
    import gmix_curvature.curvature._norms as norms

    monkeypatch.setattr(norms, "DETECT_DIRECT", False)
    model, x, g, params = _materialise(next(c for c in CASES if c.name == "vit"))
    psn = PerSampleNorms(model, params)
    out = psn.forward(x)
    assert psn.routes[""] == psn.routes["encoder"] == "fallback"
    assert psn.routes["conv_proj"] == "rule:conv"
    v = torch.randn(out.shape, generator=g, dtype=out.dtype)
    ref = PerSampleNorms(model, params, "func")
    ref.forward(x)
    got, want = psn.norms(v), ref.norms(v)
    for name in ("class_token", "encoder.pos_embedding", "conv_proj.weight"):
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=0)


def test_parameters_asked_for_are_measured_frozen_or_not() -> None:
    """A frozen parameter in ``params`` gets its norm (as from the whole-model path); one left out gets none."""
    model = _layer_norm_mlp().double()
    model[0].weight.requires_grad_(False)
    params = {k: p for k, p in model.named_parameters() if k != "5.bias"}
    x = torch.randn(3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hooks, ref = PerSampleNorms(model, params), PerSampleNorms(model, params, "func")
    out = hooks.forward(x)
    ref.forward(x)
    v = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got, want = hooks.norms(v), ref.norms(v)
    assert set(got) == set(params) and float(got["0.weight"].min()) > 0
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=0)


class OneUse(nn.Module):
    """A Linear child and one parameter of the module's own, used as ``use(h, p)``."""

    def __init__(self, shape: tuple[int, ...], use: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.p = nn.Parameter(torch.linspace(-0.5, 0.7, math.prod(shape)).reshape(shape))
        self.use = use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.use(torch.tanh(self.fc(x)), self.p).sum(1)


# (id, shape of p, use, its route): x is (N=3, T=5, 4)
DIRECT_USES = [
    ("add", (4,), lambda h, p: h + p, "direct"),
    ("radd_sliced", (7, 4), lambda h, p: p[:5] + h, "direct"),
    ("mul_transposed", (4, 5), lambda h, p: h * p.t(), "direct"),
    ("div_leading_one", (1, 5, 4), lambda h, p: h / (2 + 0 * h + p.exp()), "fallback"),
    ("inplace_add_on_h", (5, 4), lambda h, p: h.clone().add_(p), "direct"),
    ("expand_overlapping", (1, 4), lambda h, p: h + p.expand(5, 4), "fallback"),
    ("used_twice", (4,), lambda h, p: torch.tanh(h + p) * p, "fallback"),
    ("gathered", (9, 4), lambda h, p: h + p[torch.tensor([0, 2, 4, 6, 8])], "fallback"),
    ("not_over_the_batch", (3, 1, 4), lambda h, p: h + p, "fallback"),
    ("matmul", (4, 4), lambda h, p: h @ p, "fallback"),
]


@pytest.mark.parametrize("shape, use, route", [c[1:] for c in DIRECT_USES], ids=[c[0] for c in DIRECT_USES])
def test_direct_uses_are_found_and_others_keep_the_fallback(shape: tuple, use: Callable, route: str) -> None:
    """Only a single broadcast over the batch of a view holding each element once is taken as direct; every
    other use keeps the module-local fallback. Both equal the whole-model path."""
    state = torch.random.get_rng_state()
    torch.random.manual_seed(0)
    model = OneUse(shape, use).double()
    torch.random.set_rng_state(state)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    hooks, ref = PerSampleNorms(model, params), PerSampleNorms(model, params, "func")
    out = hooks.forward(x)
    assert hooks.routes.get("p" if route == "direct" else "") == route, hooks.routes
    ref.forward(x)
    for _ in range(2):
        x2 = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)  # a second batch: the substitution again
        out = hooks.forward(x2)
        ref.forward(x2)
        v = torch.randn(out.shape, generator=g, dtype=out.dtype)
        got, want = hooks.norms(v), ref.norms(v)
        for name in params:
            torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=0, msg=name)


class Inner(nn.Module):
    """A non-leaf module with a direct use (a bias broadcast over the batch) around a Linear child."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.shift = nn.Parameter(torch.linspace(-0.3, 0.3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)) + self.shift


class Outer(nn.Module):
    """Calls ``F.linear`` on its child's weight (as Swin's attention does): the fallback takes it whole, and with
    it the direct use inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + nn.functional.linear(x, self.inner.fc.weight)


def test_a_direct_use_inside_a_module_the_fallback_takes_whole() -> None:
    state = torch.random.get_rng_state()
    torch.random.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Outer(), nn.Linear(4, 3)).double()
    torch.random.set_rng_state(state)
    params = dict(model.named_parameters())
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hooks, ref = PerSampleNorms(model, params), PerSampleNorms(model, params, "func")
    out = hooks.forward(x)
    assert hooks.routes == {"0": LINEAR, "1": "fallback", "2": LINEAR}, hooks.routes
    ref.forward(x)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    got, want = hooks.norms(v), ref.norms(v)
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=0, msg=name)
