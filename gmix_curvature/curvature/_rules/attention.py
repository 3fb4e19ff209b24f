"""nn.MultiheadAttention as one module: its input projections and its output projection.

``nn.TransformerEncoderLayer`` and ``F.multi_head_attention_forward`` use ``out_proj`` functionally, so a hook
on ``out_proj`` never fires; the rule owns all of the attention's parameters instead. From the recorded
query, key and value it recomputes Q, K, V, the attention probabilities and the context C (the input of
``out_proj``) once per forward pass (kept across the backward passes within the cache budget), then
backpropagates each recorded output gradient g through the softmax attention by hand (batched: the
samples of a batch do not interact) to get the gradients at Q, K and V. Each projection is
then a Linear over positions (:func:`linear.weight_norms`): in_proj's three row blocks are disjoint, so its
squared norm is the sum of the query, key and value blocks'.
Not covered (the module-local fallback takes them): add_bias_kv, add_zero_attn, dropout in train mode.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from gmix_curvature.curvature._rules import LayerRule, Record, register
from gmix_curvature.curvature._rules.linear import weight_norms
from gmix_curvature.errors import GmixError

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttentionRule(LayerRule):
    name = "multihead_attention"
    classes = (nn.MultiheadAttention,)

    def applies(self, m: nn.Module) -> bool:
        return (
            type(m).forward is nn.MultiheadAttention.forward
            and m.bias_k is None
            and not m.add_zero_attn
            and type(m.out_proj).forward is nn.Linear.forward
        )

    def params(self, m: nn.Module) -> dict[str, nn.Parameter]:
        return dict(m.named_parameters())

    def _forward(self, rec: Record) -> dict[str, torch.Tensor]:
        """Q, K, V, the attention probabilities P and the context C of the recorded call (batch-first),
        kept between the backward passes of one forward pass while they fit the cache budget."""
        return rec.keep("attention", lambda: self._recompute(rec))

    def _recompute(self, rec: Record) -> dict[str, torch.Tensor]:
        m: nn.MultiheadAttention = rec.module
        bound = _SIGNATURE.bind(m, *rec.args, **rec.kwargs)
        bound.apply_defaults()
        a = bound.arguments
        q, k, v = a["query"], a["key"], a["value"]
        if not m.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        n, length, e = q.shape
        s, heads, d = k.shape[1], m.num_heads, m.head_dim
        if m._qkv_same_embed_dim:
            wq, wk, wv = m.in_proj_weight.detach().chunk(3)
        else:
            wq, wk, wv = m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach()
        bq, bk, bv = m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None else (None, None, None)
        mask = None
        attn_mask = _float_mask(a["attn_mask"], q.dtype)
        if attn_mask is not None:
            mask = attn_mask.view(1, 1, length, s) if attn_mask.dim() == 2 else attn_mask.view(n, heads, length, s)
        kpm = _float_mask(a["key_padding_mask"], q.dtype)
        if kpm is not None:
            mask = kpm.view(n, 1, 1, s) if mask is None else mask + kpm.view(n, 1, 1, s)
        qh = F.linear(q, wq, bq).view(n, length, heads, d).transpose(1, 2)  # (n, H, L, d)
        kh = F.linear(k, wk, bk).view(n, s, heads, d).transpose(1, 2)
        vh = F.linear(v, wv, bv).view(n, s, heads, d).transpose(1, 2)
        scores = (qh * (1.0 / math.sqrt(d))) @ kh.transpose(-1, -2)  # (n, H, L, S)
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(-1)
        context = (probs @ vh).transpose(1, 2).reshape(n, length, e)
        return {"q": q, "k": k, "v": v, "qh": qh, "kh": kh, "vh": vh, "p": probs, "c": context}

    def _backward(self, rec: Record) -> dict[str, torch.Tensor]:
        """The gradients at the projected queries, keys and values: the softmax attention's backward by hand."""
        m: nn.MultiheadAttention = rec.module
        if m.training and m.dropout > 0:
            raise GmixError("per-sample norms of a MultiheadAttention in train mode with dropout: use eval mode")
        t = dict(self._forward(rec))
        g = rec.g if m.batch_first else rec.g.transpose(0, 1)
        n, length, e = g.shape
        heads, d = m.num_heads, m.head_dim
        probs, qh, kh, vh = t["p"], t["qh"], t["kh"], t["vh"]
        dc = (g @ m.out_proj.weight.detach()).view(n, length, heads, d).transpose(1, 2)  # (n, H, L, d)
        dv = probs.transpose(-1, -2) @ dc
        dp = dc @ vh.transpose(-1, -2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
        scale = 1.0 / math.sqrt(d)
        dq, dk = (ds @ kh) * scale, (ds.transpose(-1, -2) @ qh) * scale
        t["g"] = g
        for name, grad in (("gq", dq), ("gk", dk), ("gv", dv)):
            t[name] = grad.transpose(1, 2).reshape(n, grad.shape[2], e)
        return t

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        m = rec.module
        t = self._backward(rec)
        blocks = [weight_norms(t[x], t["g" + x], rec, x) for x in "qkv"]
        out = {}
        if m._qkv_same_embed_dim:
            out["in_proj_weight"] = blocks[0] + blocks[1] + blocks[2]
        else:
            out.update({f"{x}_proj_weight": b for x, b in zip("qkv", blocks)})
        if m.in_proj_bias is not None:
            out["in_proj_bias"] = sum(t["g" + x].sum(1).square().sum(1) for x in "qkv")
        out["out_proj.weight"] = weight_norms(t["c"], t["g"], rec, "c")
        if m.out_proj.bias is not None:
            out["out_proj.bias"] = t["g"].sum(1).square().sum(1)
        return out

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m = rec.module
        t = self._backward(rec)
        blocks = [torch.einsum("nto,nti->noi", t["g" + x], t[x]) for x in "qkv"]
        out = {}
        if m._qkv_same_embed_dim:
            out["in_proj_weight"] = torch.cat(blocks, 1)
        else:
            out.update({f"{x}_proj_weight": b for x, b in zip("qkv", blocks)})
        if m.in_proj_bias is not None:
            out["in_proj_bias"] = torch.cat([t["g" + x].sum(1) for x in "qkv"], 1)
        out["out_proj.weight"] = torch.einsum("nto,nti->noi", t["g"], t["c"])
        if m.out_proj.bias is not None:
            out["out_proj.bias"] = t["g"].sum(1)
        return out


register(MultiheadAttentionRule())
