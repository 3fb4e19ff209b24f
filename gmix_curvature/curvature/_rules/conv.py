"""Conv1d and Conv2d (zero padding, any stride, dilation, groups, string padding).

With U_i the unfolded input (c_in k, L) and G_i the output gradient (c_out, L) of sample i, the weight
gradient is G_i U_iᵀ: its squared norm is either the ghost norm Σ_{l,l'} (U_iᵀU_i)_{ll'} (G_iᵀG_i)_{ll'} or
‖G_i U_iᵀ‖² with the product formed, whichever costs fewer operations (:func:`conv_rule`). The product is
formed without unfolding, as the weight gradient of one convolution that takes the samples as groups
(``torch.nn.grad.conv2d_weight``: the backend's weight-gradient kernel, 2-3× faster than unfold + matmul on
a CPU at 32×32). A Conv1d is a Conv2d of height 1. The Gram matrices U_iᵀU_i of the ghost rule are kept
between the backward passes of one forward pass up to ``CACHE_BUDGET`` elements.
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
        pads = [(p, p) for p in ((0, m.padding[0]) if isinstance(m, nn.Conv1d) else m.padding)]
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
        parts = []
        for s in range(0, n, chunk):
            if rule == "ghost":
                gram = rec.keep(f"gram_{s}", lambda s=s: self._gram(a[s : s + chunk], kernel, dilation, stride, groups))
                gc = g[s : s + chunk]
                parts.append((gram * torch.einsum("ngol,ngom->nglm", gc, gc)).sum((1, 2, 3)))
            else:
                w = self._per_sample_weight(m, a[s : s + chunk], rec.g[s : s + chunk], kernel, dilation, stride)
                parts.append(torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).square())
        out = {"weight": torch.cat(parts)}
        if m.bias is not None:
            out["bias"] = g.sum(-1).square().sum((1, 2))
        return out

    @staticmethod
    def _gram(a: torch.Tensor, kernel: tuple, dilation: tuple, stride: tuple, groups: int) -> torch.Tensor:
        """(U_iᵀ U_i) per sample and group, (c, G, L, L), from the unfolded input."""
        u = F.unfold(a, kernel, dilation, 0, stride)
        u = u.reshape(u.shape[0], groups, -1, u.shape[-1])  # (c, G, cin·k, L)
        return torch.einsum("ngil,ngim->nglm", u, u)

    @staticmethod
    def _per_sample_weight(
        m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, g: torch.Tensor, kernel: tuple, dilation: tuple, stride: tuple
    ) -> torch.Tensor:
        """The per-sample weight gradients G_i U_iᵀ, (c, c_out, c_in/G, *kernel), as the weight gradient of one
        convolution with the samples as groups (no unfolded input: the backend's own weight-gradient kernel)."""
        c, cin, cout = a.shape[0], m.in_channels, m.out_channels
        g = g.reshape(c, cout, -1, g.shape[-1])  # Conv1d: height 1
        w = torch.nn.grad.conv2d_weight(
            a.reshape(1, c * cin, *a.shape[2:]), (c * cout, cin // m.groups, *kernel),
            g.reshape(1, c * cout, *g.shape[2:]), stride, 0, dilation, c * m.groups,
        )  # fmt: skip
        return w.reshape(c, *m.weight.shape)

    def grads(self, rec: Record) -> dict[str, torch.Tensor]:
        m, n = rec.module, rec.n
        a, kernel, dilation, stride = _geometry(m, rec.a)
        out = {"weight": self._per_sample_weight(m, a, rec.g, kernel, dilation, stride)}
        if m.bias is not None:
            out["bias"] = rec.g.reshape(n, m.out_channels, -1).sum(-1)
        return out


register(ConvRule())
