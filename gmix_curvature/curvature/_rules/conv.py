"""Conv1d and Conv2d (zero padding, any stride, dilation, groups, string padding).

With U_i the unfolded input (c_in k, L) and G_i the output gradient (c_out, L) of sample i, the weight
gradient is G_i U_iᵀ: its squared norm is either the ghost norm Σ_{l,l'} (U_iᵀU_i)_{ll'} (G_iᵀG_i)_{ll'} or
‖G_i U_iᵀ‖² with the product formed, whichever costs fewer operations (:func:`conv_rule`). A Conv1d is a
Conv2d of height 1. The unfolded inputs (or their Gram matrices) are kept between the backward passes of
one forward pass up to ``CACHE_BUDGET`` elements.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gmix_curvature.curvature._rules import LayerRule, Record, register

UNFOLD_BUDGET = 2**25  # elements of an unfolded input chunk
# Unfolded conv inputs kept between the backward passes of one forward pass (exact's C classes, the
# probes of a stochastic method) up to this many elements; beyond it they are recomputed each pass.
CACHE_BUDGET = 2**26


def conv_rule(m: nn.Conv1d | nn.Conv2d, n: int, spatial_out: int) -> str:
    """``"ghost"`` or ``"materialise"``: the cheaper per-sample rule of a convolution (operation count)."""
    k = math.prod(m.kernel_size)
    cin, cout = m.in_channels // m.groups, m.out_channels // m.groups
    ghost = spatial_out * spatial_out * (cin * k + cout)
    mat = cout * cin * k * spatial_out
    return "ghost" if ghost < mat else "materialise"


def _geometry(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple, tuple]:
    """The input as a 2-d batch with explicit zero padding, and the 2-d kernel, dilation and stride."""
    pair = (lambda t: (1, t[0])) if isinstance(m, nn.Conv1d) else tuple
    if isinstance(m, nn.Conv1d):
        a = a.unsqueeze(2)
    kernel, dilation, stride = pair(m.kernel_size), pair(m.dilation), pair(m.stride)
    if isinstance(m.padding, str):
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1) if m.padding == "same" else 0
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in pair(m.padding)]
    if any(pads):
        a = F.pad(a, (*pads[1], *pads[0]))
    return a, kernel, dilation, stride


class ConvRule(LayerRule):
    name = "conv"
    classes = (nn.Conv1d, nn.Conv2d)

    def applies(self, m: nn.Module) -> bool:
        return super().applies(m) and m.padding_mode == "zeros"

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        m, n = rec.module, rec.n
        groups = m.groups
        g = rec.g.reshape(n, groups, m.out_channels // groups, -1)  # (n, G, cout, L)
        spatial = g.shape[-1]
        rule = rec.options.get("conv_rule") or conv_rule(m, n, spatial)
        a, kernel, dilation, stride = _geometry(m, rec.a)
        per_sample = a[0].numel() * math.prod(kernel)
        chunk = max(1, UNFOLD_BUDGET // max(per_sample, 1))
        cache = rec.cache
        parts = []
        for s in range(0, n, chunk):
            key = ("conv", s)
            if key in cache:
                u = cache[key]  # the unfolded input (or its Gram matrix) of this forward pass, shared by all v
            else:
                u = F.unfold(a[s : s + chunk], kernel, dilation, 0, stride)
                u = u.reshape(u.shape[0], groups, -1, spatial)  # (c, G, cin·k, L)
                if rule == "ghost":
                    u = torch.einsum("ngil,ngim->nglm", u, u)
                budget = rec.options.get("budget")
                if budget is not None and budget[0] >= u.numel():
                    cache[key] = u
                    budget[0] -= u.numel()
            gc = g[s : s + chunk]
            if rule == "ghost":
                gg = torch.einsum("ngol,ngom->nglm", gc, gc)
                parts.append((u * gg).sum((1, 2, 3)))
            else:
                parts.append(torch.linalg.vector_norm(torch.einsum("ngil,ngol->ngio", u, gc), dim=(1, 2, 3)).square())
        out = {"weight": torch.cat(parts)}
        if m.bias is not None:
            out["bias"] = g.sum(-1).square().sum((1, 2))
        return out

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m, n = rec.module, rec.n
        groups = m.groups
        g = rec.g.reshape(n, groups, m.out_channels // groups, -1)
        a, kernel, dilation, stride = _geometry(m, rec.a)
        u = F.unfold(a, kernel, dilation, 0, stride).reshape(n, groups, -1, g.shape[-1])
        out = {"weight": torch.einsum("ngil,ngol->ngoi", u, g).reshape(n, *m.weight.shape)}
        if m.bias is not None:
            out["bias"] = g.sum(-1).reshape(n, -1)
        return out


register(ConvRule())
