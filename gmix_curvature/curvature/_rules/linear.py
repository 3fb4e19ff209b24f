"""Linear layers over any number of positions per sample: nn.Linear and Hugging Face's Conv1D (GPT-2).

The per-sample weight gradient is G_i = Σ_t g_t a_tᵀ over the sample's positions t. Its squared norm is
either the ghost norm Σ_{t,t'} ⟨a_t, a_t'⟩⟨g_t, g_t'⟩ (T² (d_in + d_out) operations) or ‖G_i‖² with G_i
materialised (T d_in d_out), whichever costs fewer operations (Li et al. 2022, "Large language models can
be strong differentially private learners", the ghost clipping of Opacus' ``linear.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from gmix_curvature.curvature._rules import Factor, LayerRule, Record, register


def weight_norms(a: torch.Tensor, g: torch.Tensor, rec: Record | None = None, key: str = "a") -> torch.Tensor:
    """‖Σ_t g_t a_tᵀ‖² per sample for a (N, T, d_in), g (N, T, d_out): ghost or materialised by operation count.
    With ``rec``, the input's part (‖a‖², the Gram matrix a aᵀ) is kept for the next backward passes."""
    t, din, dout = a.shape[1], a.shape[2], g.shape[2]
    keep = rec.keep if rec is not None else (lambda _, make: make())
    if t == 1:
        return keep(f"sq_{key}", lambda: a.square().sum((1, 2))) * g.square().sum((1, 2))
    if t * t * (din + dout) < t * din * dout:
        gram = keep(f"gram_{key}", lambda: torch.bmm(a, a.transpose(1, 2)))
        return (gram * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.linalg.vector_norm(torch.bmm(g.transpose(1, 2), a), dim=(1, 2)).square()


def _flat(rec: Record) -> tuple[torch.Tensor, torch.Tensor]:
    n = rec.n
    a, g = rec.a, rec.g
    return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])


class LinearRule(LayerRule):
    name = "linear"
    classes = (nn.Linear,)

    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        a, g = _flat(rec)
        out = {"weight": weight_norms(a, g, rec)}
        if rec.module.bias is not None:
            out["bias"] = g.sum(1).square().sum(1)
        return out

    def grads(self, rec: Record) -> dict[str, Factor | torch.Tensor]:
        a, g = _flat(rec)
        m = rec.module
        out: dict[str, Factor | torch.Tensor] = {"weight": Factor(g, a, m.weight.shape[0])}
        if m.bias is not None:
            out["bias"] = g.sum(1)
        return out


class HFConv1DRule(LinearRule):
    """transformers' Conv1D: y = x W + b with W stored as (d_in, d_out); the same norms as a Linear."""

    name = "hf_conv1d"

    def applies(self, m: nn.Module) -> bool:
        cls = type(m)
        if cls.__name__ != "Conv1D" or not cls.__module__.startswith("transformers."):
            return False
        return all(k in self.param_names for k, _ in m.named_parameters(recurse=False))

    def grads(self, rec: Record) -> dict[str, Factor | torch.Tensor]:
        a, g = _flat(rec)
        out: dict[str, Factor | torch.Tensor] = {"weight": Factor(g, a, g.shape[-1], transpose=True)}
        if rec.module.bias is not None:
            out["bias"] = g.sum(1)
        return out


register(LinearRule())
register(HFConv1DRule())
