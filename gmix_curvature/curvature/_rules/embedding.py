"""nn.Embedding: the ghost norm through token equality.

The per-sample weight gradient is G_i = Σ_t e_{tok_t} g_tᵀ (rows of the looked-up tokens), so
‖G_i‖² = Σ_{t,t'} [tok_t = tok_t'] ⟨g_t, g_t'⟩: the output gradients summed per distinct (sample, token)
pair, then squared — O(N T d) with no (V, d) tensor per sample (Opacus' ``embedding_norm_sample.py``).
Positions holding ``padding_idx`` get no gradient (PyTorch's embedding backward skips them).
"""

from __future__ import annotations

import torch
from torch import nn

from gmix_curvature.curvature._rules import Factor, LayerRule, Record, register


def _ids_grads(rec: Record) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = rec.module, rec.n
    ids = rec.a.reshape(n, -1)
    g = rec.g.reshape(n, ids.shape[1], -1)
    if m.padding_idx is not None:
        g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
    return ids, g


class EmbeddingRule(LayerRule):
    name = "embedding"
    classes = (nn.Embedding,)
    param_names = ("weight",)

    def applies(self, m: nn.Module) -> bool:
        # max_norm renormalises rows in the forward pass; scale_grad_by_freq rescales the gradient by counts
        return super().applies(m) and m.max_norm is None and not m.scale_grad_by_freq

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        ids, g = _ids_grads(rec)
        n, t = ids.shape
        vocab = rec.module.num_embeddings
        if "pairs" not in rec.cache:  # the distinct (sample, token) pairs of this forward pass
            key = ids + vocab * torch.arange(n, device=ids.device).unsqueeze(1)
            uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
            rec.cache["pairs"] = (torch.div(uniq, vocab, rounding_mode="floor"), inv)
        sample, inv = rec.cache["pairs"]
        sums = g.new_zeros(sample.shape[0], g.shape[-1]).index_add_(0, inv, g.reshape(n * t, -1))
        out = g.new_zeros(n).index_add_(0, sample, sums.square().sum(1))
        return {"weight": out}

    def grads(self, rec: Record) -> dict[str, Factor]:
        ids, g = _ids_grads(rec)
        return {"weight": Factor(ids, g, rec.module.num_embeddings)}


register(EmbeddingRule())
