"""Transformer-base (Vaswani et al. 2017) from ``torch.nn`` for Multi30k (Section 5.2, Fig. 3).

Base sizes: d_model 512, 8 heads, 6 encoder and 6 decoder layers, feed-forward 2048, dropout 0.1,
post-LayerNorm as in the original. One vocabulary is shared by source and target (built from the
training text by :class:`~gmix_curvature.data_large.WordTokenizer`), so — as in the original — the
encoder embedding, the decoder embedding and the output projection share one weight matrix; the
embeddings are scaled by √d_model and added to sinusoidal positions.

The input is the (B, 2, L) tensor of :class:`~gmix_curvature.data_large.Multi30kDataset` (source ids,
decoder input ids; 0 pads) and the output the (B, L, V) logits of the next target token, so the
training engine can call ``model(x)`` as for an image classifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TransformerSeq2Seq", "build_transformer"]

PAD = 0


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos/10000^(2i/d)), PE(pos, 2i+1) = cos(·) (Vaswani et al. 2017, Section 3.5).

    >>> sinusoidal_positions(3, 4)[1]
    tensor([0.8415, 0.5403, 0.0100, 0.9999])
    """
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return pe.to(torch.float32)


class TransformerSeq2Seq(nn.Module):
    """Encoder–decoder Transformer with tied embeddings; ``forward(x)`` with x = (src, decoder input).

    >>> net = TransformerSeq2Seq(20, max_len=8, d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    >>> net(torch.randint(1, 20, (3, 2, 5))).shape
    torch.Size([3, 5, 20])
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        max_len: int = 128,
        d_model: int = 512,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if vocab_size < 5 or d_model % nhead or d_model % 2:
            raise ValueError(
                f"need vocab_size >= 5 and an even d_model divisible by nhead, got {vocab_size}, {d_model}, {nhead}"
            )
        self.d_model, self.max_len = d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        enc = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        dec = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(enc, num_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, num_layers)
        self.out = nn.Linear(d_model, vocab_size, bias=False)
        self.out.weight = self.embed.weight  # tied (Vaswani et al. 2017, Section 3.4)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence of length {ids.shape[1]} exceeds max_len={self.max_len}")
        h = self.embed(ids) * math.sqrt(self.d_model) + self.positions[: ids.shape[1]].to(self.embed.weight.dtype)
        return self.dropout(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"expected token ids of shape (B, 2, L), got {tuple(x.shape)}")
        src, tgt = x[:, 0], x[:, 1]
        src_pad, tgt_pad = src == PAD, tgt == PAD
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=x.device, dtype=torch.bool)
        memory = self.encoder(self._embed(src), src_key_padding_mask=src_pad)
        h = self.decoder(
            self._embed(tgt),
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad,
        )
        return self.out(h)


def build_transformer(num_classes: int, input_shape: Sequence[int] = (2, 128), **kwargs) -> TransformerSeq2Seq:
    """The ``build_model`` factory: ``num_classes`` is the vocabulary size, ``input_shape[1]`` the longest
    sequence; ``kwargs`` override the base sizes (``d_model``, ``nhead``, ``num_layers``, ...).

    >>> build_transformer(100, (2, 16), d_model=32, nhead=4, num_layers=1).d_model
    32
    """
    return TransformerSeq2Seq(int(num_classes), max_len=int(input_shape[-1]), **kwargs)
