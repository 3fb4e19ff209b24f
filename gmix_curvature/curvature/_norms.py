"""Per-sample squared gradient norms ‖J_iᵀ v_i‖² of the surrogate loss Σ_i ⟨f_i, v_i⟩, per parameter.

This is the inner loop of every estimator built on per-sample norms (exact, fisher_mc, fisher_is,
output_hutchinson, the empirical Fisher). Two backends:

* ``"hooks"`` — layer rules that never form per-sample gradients of the whole model. One forward pass
  records each layer's input; each backward pass (one per output-space vector v) records the gradient
  at each layer's output, and the per-sample norms follow per layer:
  Linear ‖a_i‖²‖g_i‖² (the "ghost norm"); Conv2d either the ghost norm Σ_{l,l'} (U_iᵀU_i)_{ll'}(G_iᵀG_i)_{ll'}
  of the unfolded input U_i and output gradient G_i, or the materialised per-sample weight gradient
  G_i U_iᵀ, whichever costs fewer operations (ghost wins at small spatial size and large width);
  BatchNorm in eval mode Σ_spatial g ⊙ x̂ and Σ_spatial g. The forward pass is shared by all vectors.
* ``"func"`` — ``torch.func.vmap(grad)`` over samples: any model whose samples are independent.

``"auto"`` takes the hooks where every parameter sits in a supported layer, else ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gmix_curvature.curvature._outputs import OutputFn, call_model, resolve_output_fn
from gmix_curvature.errors import GmixError

__all__ = ["PerSampleNorms", "BACKENDS", "supports_hooks"]

BACKENDS = ("auto", "hooks", "func")
_UNFOLD_BUDGET = 2**25  # elements of an unfolded input chunk
# Unfolded conv inputs kept between the backward passes of one forward pass (exact's C classes, the
# probes of a stochastic method) up to this many elements; beyond it they are recomputed each pass.
CACHE_BUDGET = 2**26


def _hookable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros"
    if isinstance(m, _BatchNorm):
        return m.track_running_stats and m.running_mean is not None
    return False


def supports_hooks(model: nn.Module, params: dict[str, nn.Parameter]) -> bool:
    """Whether every trainable parameter belongs to exactly one supported layer."""
    owner: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                if not _hookable(m):
                    return False
                owner[id(p)] = owner.get(id(p), 0) + 1
    return all(owner.get(id(p), 0) == 1 for p in params.values())


def _linear_norms(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])
    g = g.reshape(n, -1, g.shape[-1])
    out = {}
    if a.shape[1] == 1:
        out["weight"] = a.square().sum((1, 2)) * g.square().sum((1, 2))
    else:
        t, din, dout = a.shape[1], a.shape[2], g.shape[2]
        if t * t * (din + dout) < t * din * dout:
            out["weight"] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        else:
            out["weight"] = torch.einsum("nti,nto->nio", a, g).square().sum((1, 2))
    if m.bias is not None:
        out["bias"] = g.sum(1).square().sum(1)
    return out


def conv_rule(m: nn.Conv2d, n: int, spatial_out: int) -> str:
    """``"ghost"`` or ``"materialise"``: the cheaper per-sample rule of a Conv2d layer (operation count)."""
    k = m.kernel_size[0] * m.kernel_size[1]
    cin, cout = m.in_channels // m.groups, m.out_channels // m.groups
    ghost = spatial_out * spatial_out * (cin * k + cout)
    mat = cout * cin * k * spatial_out
    return "ghost" if ghost < mat else "materialise"


def _conv_norms(
    m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, rule: str | None, cache: dict | None = None
) -> dict[str, torch.Tensor]:
    n, groups = a.shape[0], m.groups
    g = g.reshape(n, groups, m.out_channels // groups, -1)  # (n, G, cout, L)
    spatial = g.shape[-1]
    rule = rule or conv_rule(m, n, spatial)
    per_sample = a[0].numel() * m.kernel_size[0] * m.kernel_size[1]
    chunk = max(1, _UNFOLD_BUDGET // max(per_sample, 1))
    parts = []
    for s in range(0, n, chunk):
        key = (id(m), s)
        if cache is not None and key in cache:
            u = cache[key]  # the unfolded input (or its Gram matrix) of this forward pass, shared by all v
        else:
            u = F.unfold(a[s : s + chunk], m.kernel_size, m.dilation, m.padding, m.stride)
            u = u.reshape(u.shape[0], groups, -1, spatial)  # (c, G, cin·k, L)
            if rule == "ghost":
                u = torch.einsum("ngil,ngim->nglm", u, u)
            if cache is not None and cache.get("_free", 0) >= u.numel():
                cache[key] = u
                cache["_free"] -= u.numel()
        gc = g[s : s + chunk]
        if rule == "ghost":
            gg = torch.einsum("ngol,ngom->nglm", gc, gc)
            parts.append((u * gg).sum((1, 2, 3)))
        else:
            parts.append(torch.einsum("ngil,ngol->ngio", u, gc).square().sum((1, 2, 3)))
    out = {"weight": torch.cat(parts)}
    if m.bias is not None:
        out["bias"] = g.sum(-1).square().sum((1, 2))
    return out


def _bn_norms(m: _BatchNorm, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    n, ch = a.shape[0], a.shape[1]
    shape = (1, ch) + (1,) * (a.ndim - 2)
    xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    out = {}
    if m.weight is not None:
        out["weight"] = (g * xhat).reshape(n, ch, -1).sum(-1).square().sum(1)
    if m.bias is not None:
        out["bias"] = g.reshape(n, ch, -1).sum(-1).square().sum(1)
    return out


class PerSampleNorms:
    """Per-sample squared gradient norms of Σ_i ⟨f_i, v_i⟩ for many v, one forward pass shared.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> psn = PerSampleNorms(net, dict(net.named_parameters()))
    >>> logits = psn.forward(torch.randn(5, 3))
    >>> norms = psn.norms(torch.ones(5, 2))
    >>> sorted(norms), tuple(norms["0.weight"].shape)
    (['0.bias', '0.weight', '2.bias', '2.weight'], (5,))
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        backend: str = "auto",
        conv_rule: str | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise GmixError(f"unknown per-sample-norm backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if conv_rule not in (None, "ghost", "materialise"):
            raise GmixError(f"unknown conv rule {conv_rule!r}; valid: ghost, materialise")
        ok = supports_hooks(model, params)
        if backend == "hooks" and not ok:
            raise GmixError("the hooks backend supports Linear, Conv2d and BatchNorm layers only; use backend='func'")
        self.backend = "hooks" if (backend == "hooks" or (backend == "auto" and ok)) else "func"
        self.model, self.params, self.conv_rule = model, params, conv_rule
        self.output_fn = resolve_output_fn(output_fn)
        self._names = {id(p): name for name, p in params.items()}
        self._x: Any = None
        self._logits: torch.Tensor | None = None
        self._records: list[tuple[nn.Module, str, torch.Tensor, list]] = []

    # hooks backend -----------------------------------------------------------------------------
    def _forward_hook(self, prefix: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            slot: list = []
            self._records.append((module, prefix, inputs[0].detach(), slot))
            output.register_hook(lambda grad: slot.append(grad.detach()))

        return hook

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the model on a batch (a batch-first tensor, or a mapping of them passed as ``model(**x)``) and
        keep what the backward passes need; returns ``output_fn`` of the output, detached, of any shape."""
        self._records = []
        self._cache: dict = {"_free": CACHE_BUDGET}
        if self.backend == "func":
            self._x = x
            with torch.no_grad():
                self._logits = self.output_fn(call_model(self.model, x))
            return self._logits
        handles = [
            m.register_forward_hook(self._forward_hook(name))
            for name, m in self.model.named_modules()
            if _hookable(m) and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        try:
            self._x = _leaves(x)
            with torch.enable_grad():
                self._logits = self.output_fn(call_model(self.model, self._x))
        finally:
            for h in handles:
                h.remove()
        return self._logits.detach()

    def norms(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """{parameter name: (n,) tensor of ‖∂⟨f_i, v_i⟩/∂θ_l‖²} for the batch of the last :meth:`forward`.

        ``v`` has the shape of the output; for several positions per sample (N, T, C) the norm is of the sum
        over the sample's positions, cross terms between positions included."""
        if self._logits is None:
            raise RuntimeError("call forward() first")
        if self.backend == "func":
            return self._func_norms(v)
        for _, _, _, slot in self._records:
            slot.clear()
        leaves = [t for t in _tensors(self._x) if t.requires_grad] or list(self.params.values())
        torch.autograd.grad(self._logits, leaves, grad_outputs=v.to(self._logits.dtype), retain_graph=True,
                            allow_unused=True)
        out: dict[str, torch.Tensor] = {}
        for module, _, a, slot in self._records:
            if not slot:
                g = torch.zeros((a.shape[0],), dtype=a.dtype, device=a.device)
                rules = {k: g for k, p in module.named_parameters(recurse=False) if p.requires_grad}
            else:
                grad = slot[0]
                if isinstance(module, nn.Linear):
                    rules = _linear_norms(module, a, grad)
                elif isinstance(module, nn.Conv2d):
                    rules = _conv_norms(module, a, grad, self.conv_rule, self._cache)
                else:
                    rules = _bn_norms(module, a, grad)
            for key, val in rules.items():
                name = self._names.get(id(getattr(module, key)))
                if name is not None:
                    out[name] = out[name] + val if name in out else val
        return {name: out[name] for name in self.params if name in out}

    # torch.func backend ------------------------------------------------------------------------
    def _func_norms(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        from torch.func import functional_call, grad, vmap

        names = list(self.params)
        detached = {k: p.detach() for k, p in self.params.items()}
        buffers = dict(self.model.named_buffers())
        x = self._x
        mapping = isinstance(x, Mapping)
        batched = {k: t for k, t in x.items() if isinstance(t, torch.Tensor)} if mapping else x
        fixed = {k: t for k, t in x.items() if not isinstance(t, torch.Tensor)} if mapping else {}

        def surrogate(params: dict, xi: Any, vi: torch.Tensor) -> torch.Tensor:
            if mapping:
                kwargs = {**{k: t.unsqueeze(0) for k, t in xi.items()}, **fixed}
                out = functional_call(self.model, (params, buffers), (), kwargs)
            else:
                out = functional_call(self.model, (params, buffers), (xi.unsqueeze(0),))
            return (self.output_fn(out)[0] * vi).sum()

        per_sample = vmap(grad(surrogate), in_dims=(None, 0, 0), chunk_size=64)(detached, batched, v)
        return {k: per_sample[k].reshape(v.shape[0], -1).square().sum(1) for k in names}


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, Mapping):
        return [t for t in x.values() if isinstance(t, torch.Tensor)]
    return [x] if isinstance(x, torch.Tensor) else []


def _leaves(x: Any) -> Any:
    """The batch with its floating-point tensors as fresh leaves that require grad (the backward's stopping set)."""

    def leaf(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.detach().requires_grad_(t.dtype.is_floating_point)
        return t

    if isinstance(x, Mapping):
        return {k: leaf(t) for k, t in x.items()}
    return leaf(x)
