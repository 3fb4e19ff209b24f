"""Cases as data for the curvature of models with several predictions per sample and other losses: tiny
sequence models (a decoder-only LM with right padding, the Fig. 3 Transformer with tied weights, an Embedding
tagger), an MSE regression net, a BCE multi-label net and a segmentation net in F.cross_entropy's
(N, C, H, W) layout. Each is float64, in eval mode, built from its seed; ``trained`` cases are fitted until
the mean top probability over the counted predictions reaches ``SEQ_CONFIDENCE``.

Reusable by every test module: ``from cases_seq import SEQ_CASES, SeqCase, materialise_seq`` (add a case with
a new ``SeqCase``; ``materialise_seq`` caches the model, treat it as read-only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gmix_curvature.transformer import PAD, TransformerSeq2Seq

IGNORE = -100
SEQ_CONFIDENCE = 0.99  # mean top probability over the counted predictions of a trained case


class TinyLM(nn.Module):
    """A decoder-only LM with hand-written causal attention (one block, pre-norm) and an untied head.

    ``forward(input_ids, attention_mask=None)``: (N, T) token ids -> (N, T, V) logits, or with
    ``return_dict`` a mapping ``{"logits": ...}`` (as Hugging Face models return). The attention mask (1 for
    real tokens) masks padded keys; with right padding and causal attention it changes nothing upstream of
    the padding.
    """

    def __init__(self, vocab: int = 7, width: int = 8, heads: int = 2, max_len: int = 6, return_dict: bool = False):
        super().__init__()
        self.heads, self.return_dict = heads, return_dict
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.1 * torch.randn(max_len, width))
        self.norm1, self.norm2, self.norm_f = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        n, t = input_ids.shape
        h = self.embed(input_ids) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(h)).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, -torch.inf)
        att = torch.softmax(scores, -1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(n, t, -1))
        h = h + self.mlp(self.norm2(h))
        logits = self.head(self.norm_f(h))
        return {"logits": logits} if self.return_dict else logits


class Tagger(nn.Module):
    """An Embedding token classifier: (N, T) ids -> (N, T, C) logits, and a tuple (logits, hidden)."""

    def __init__(self, vocab: int = 6, width: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.embed(ids))
        return self.out(h), h


def _lm_tokens(g: torch.Generator, n: int, t: int, vocab: int, lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """Right-padded sequences with distinct first tokens (so a trained LM can be confident everywhere);
    labels are the next tokens, ignore_index past each sequence's end."""
    seq = torch.randint(1, vocab, (n, t + 1), generator=g)
    seq[:, 0] = torch.randperm(vocab - 1, generator=g)[:n] + 1
    ids, labels = seq[:, :-1].clone(), seq[:, 1:].clone()
    mask = torch.zeros(n, t, dtype=torch.int64)
    for i, length in enumerate(lengths):
        ids[i, length:] = PAD
        labels[i, length - 1 :] = IGNORE  # the last real token has no next token: ignored too
        mask[i, :length] = 1
    return ids, labels, mask


def _lm(g: torch.Generator, **kw: Any) -> tuple[nn.Module, Any, torch.Tensor]:
    ids, labels, _ = _lm_tokens(g, 4, 5, 7, [5, 3, 4, 5])
    return TinyLM(**kw), ids, labels


def _lm_dict(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    """The LM called as Hugging Face models are: model(**{"input_ids", "attention_mask"}) -> {"logits"}."""
    ids, labels, mask = _lm_tokens(g, 4, 5, 7, [5, 3, 4, 5])
    return TinyLM(return_dict=True), {"input_ids": ids, "attention_mask": mask}, labels


def _fig3(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    """The Fig. 3 Transformer at toy size (tied embedding/output weights), padded sources and targets."""
    n, length, vocab = 3, 4, 7
    src = torch.randint(1, vocab, (n, length), generator=g)
    tgt = torch.randint(1, vocab, (n, length + 1), generator=g)
    src[1, 3:] = PAD
    tgt[2, 3:] = PAD
    x = torch.stack([src, tgt[:, :-1]], 1)
    y = tgt[:, 1:].clone()
    y[y == PAD] = IGNORE
    model = TransformerSeq2Seq(vocab, max_len=length, d_model=8, nhead=2, num_layers=1, dim_feedforward=8, dropout=0.0)
    return model, x, y


def _tagger(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    ids = torch.randint(0, 6, (5, 3), generator=g)
    y = torch.randint(0, 4, (5, 3), generator=g)
    y[0, 2] = y[3, 0] = IGNORE
    return Tagger(), ids, y


def _mse(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    x = torch.randn(6, 4, generator=g)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), x, torch.randn(6, 3, generator=g)


def _mse_seq(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    """MSE on (N, T, D) outputs: a prediction is a D-vector at one position."""
    x = torch.randn(4, 3, 2, generator=g)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)), x, torch.randn(4, 3, 2, generator=g)


def _bce(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    x = torch.randn(6, 4, generator=g)
    y = torch.randint(0, 2, (6, 5), generator=g).double()
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)), x, y


def _mse_seq_padded(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    """Sequence regression with padding: NaN targets mark positions that are not counted."""
    model, x, y = _mse_seq(g)
    y[0, 2] = y[3, 0] = float("nan")
    return model, x, y


def _bce_missing(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    """A multi-label head with missing labels (NaN: not counted)."""
    model, x, y = _bce(g)
    y[1, 3] = y[4, 0] = y[4, 4] = float("nan")
    return model, x, y


def _segmentation(g: torch.Generator) -> tuple[nn.Module, Any, torch.Tensor]:
    x = torch.randn(3, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (3, 4, 4), generator=g)
    y[0, :2, :2] = IGNORE
    y[2, 3] = IGNORE
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)), x, y


@dataclass(frozen=True)
class SeqCase:
    name: str
    build: Callable[[torch.Generator], tuple[nn.Module, Any, torch.Tensor]]
    loss: str = "cross_entropy"
    trained: bool = False
    seed: int = 0
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.name}-{'trained' if self.trained else 'fresh'}"


SEQ_CASES = [
    SeqCase("tiny_lm", _lm),
    SeqCase("tiny_lm_dict", _lm_dict),
    SeqCase("fig3_transformer", _fig3),
    SeqCase("embedding_tagger", _tagger),
    SeqCase("mse_regression", _mse, loss="mse"),
    SeqCase("mse_sequence", _mse_seq, loss="mse"),
    SeqCase("bce_multilabel", _bce, loss="bce"),
    SeqCase("segmentation", _segmentation),
    SeqCase("mse_sequence_padded", _mse_seq_padded, loss="mse"),
    SeqCase("bce_missing_labels", _bce_missing, loss="bce"),
]
LM_FRESH = SEQ_CASES[0]
LM_TRAINED = SeqCase("tiny_lm", _lm, trained=True)


def _double(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x.double() if x.dtype.is_floating_point else x


@torch.no_grad()
def _top_probability(model: nn.Module, x: Any, y: torch.Tensor) -> float:
    logits = model(**x) if isinstance(x, dict) else model(x)
    logits = logits["logits"] if isinstance(logits, dict) else logits
    top = torch.softmax(logits, -1).max(-1).values
    return float(top[y != IGNORE].mean())


def _train_lm(model: nn.Module, x: Any, y: torch.Tensor) -> None:
    """Adam (dropout-free model, eval mode) until the mean top probability reaches SEQ_CONFIDENCE."""
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(2000):
        if _top_probability(model, x, y) >= SEQ_CONFIDENCE + 1e-3:
            break
        logits = model(x)
        opt.zero_grad()
        nn.functional.cross_entropy(logits.movedim(-1, 1), y, ignore_index=IGNORE).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


@functools.cache
def materialise_seq(case: SeqCase) -> tuple[nn.Module, Any, torch.Tensor]:
    """(model in eval mode, x, y) in float64 from the case's seed (cached: treat as read-only)."""
    g = torch.Generator().manual_seed(case.seed)
    state = torch.random.get_rng_state()
    try:
        torch.random.manual_seed(case.seed)  # nn.Module initialisers draw from the global RNG
        model, x, y = case.build(g)
    finally:
        torch.random.set_rng_state(state)
    model = model.double().eval()
    x, y = _double(x), _double(y) if case.loss != "cross_entropy" else y
    if case.trained:
        _train_lm(model, x, y)
        top = _top_probability(model, x, y)
        assert top >= SEQ_CONFIDENCE, f"{case.id} reached only {top:.4f}"
    for p in model.parameters():
        p.grad = None
    return model, x, y
