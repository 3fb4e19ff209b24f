"""The module-local fallback: per-sample gradients of one module's own parameters through ``torch.func``.

For a module with no rule (a custom layer, a layer scale, a relative-position table), the recorded inputs
and output gradients give each sample's gradient of the module's own parameters by
``vmap(grad(θ ↦ ⟨m(θ; x_i), g_i⟩))`` over the samples, with ``functional_call`` substituting only those
parameters (children keep theirs, tied or not): the per-sample gradients of that module alone, not of the whole model
(Opacus' ``functorch.py``). A tensor argument is taken to be batched when its first dimension is the batch
size, else shared by all samples (one that is batch-sized by coincidence, e.g. a (T, T) mask with T = N,
would be sliced: keep such modules batch-first, or use the whole-model ``backend="func"``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from gmix_curvature.curvature._rules import Record

BUDGET = 2**26  # elements of per-sample gradients formed at once


def fallback_grads(rec: Record, names: list[str]) -> dict[str, torch.Tensor]:
    """{local name: (N, *shape) per-sample gradients} of the module's parameters ``names``."""
    m, n = rec.module, rec.n
    params = {k: m.get_parameter(k).detach() for k in names}
    flat, spec = tree_flatten((rec.args, rec.kwargs))
    in_dims = [0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None for t in flat]
    slots = [j for j, g in enumerate(rec.grads) if g is not None]
    if not slots:
        return {k: p.new_zeros(n, *p.shape) for k, p in params.items()}
    gs = [rec.grads[j] for j in slots]

    def surrogate(theta: dict, leaves: list, g: list) -> torch.Tensor:
        leaves = [t.unsqueeze(0) if d == 0 else t for t, d in zip(leaves, in_dims)]
        args, kwargs = tree_unflatten(leaves, spec)
        outs = [t for t in tree_flatten(functional_call(m, theta, tuple(args), kwargs, tie_weights=False))[0]
                if isinstance(t, torch.Tensor) and t.is_floating_point()]  # fmt: skip
        return sum((outs[j][0] * gj).sum() for j, gj in zip(slots, g))

    size = max(1, sum(p.numel() for p in params.values()))
    chunk = max(1, min(n, BUDGET // size))
    try:
        return vmap(grad(surrogate), in_dims=(None, in_dims, 0), chunk_size=chunk)(params, flat, gs)
    except RuntimeError:  # no batching rule for an operation of the module, or data-dependent control flow
        rows = []
        for i in range(n):
            leaves = [t[i] if d == 0 else t for t, d in zip(flat, in_dims)]
            rows.append(grad(surrogate)(params, leaves, [gj[i] for gj in gs]))
        return {k: torch.stack([r[k] for r in rows]) for k in params}


def fallback_norms(rec: Record, names: list[str]) -> dict[str, torch.Tensor]:
    return {k: g.reshape(rec.n, -1).square().sum(1) for k, g in fallback_grads(rec, names).items()}


def direct_params(m: nn.Module) -> dict[str, nn.Parameter]:
    return dict(m.named_parameters(recurse=False))
