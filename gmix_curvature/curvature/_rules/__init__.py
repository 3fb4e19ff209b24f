"""Per-layer rules for per-sample squared gradient norms, registered by module class.

A rule turns one recorded call of a layer — its inputs ``a`` and the gradient ``g`` of the surrogate
Σ_i ⟨f_i, v_i⟩ at its output — into per-sample squared norms ‖∂⟨f_i, v_i⟩/∂θ‖² of the layer's own
parameters, without the per-sample gradients of the whole model. A parameter used by several calls
(tied weights, a module called twice) needs the per-sample gradients of all its uses summed before the
square, so a rule may also return each use's per-sample gradient as a :class:`Factor` (Σ_t r_t c_tᵀ over
the positions of a sample) or a dense (N, *shape) tensor; the engine adds the cross terms
2⟨G_i^(u), G_i^(u')⟩ between uses (see :func:`inner`).

Modules with no rule go to the module-local fallback (:mod:`.functorch`): ``torch.func`` on that
module alone. The registry follows Opacus' ``opacus/grad_sample/`` (one small rule per layer type).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["Record", "Factor", "Rule", "RULES", "register", "rule_for", "inner", "dense"]


@dataclass
class Record:
    """One call of a module in the forward pass: its inputs, and the gradients at its outputs (filled by the
    backward pass of each :meth:`PerSampleNorms.norms`). ``n`` is the batch size; ``cache`` is shared by all
    the backward passes of one forward pass (unfolded conv inputs, ...)."""

    module: nn.Module
    args: tuple
    kwargs: dict
    n: int
    grads: list = field(default_factory=list)  # one slot per recorded output tensor
    cache: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def a(self) -> torch.Tensor:
        return self.args[0]

    @property
    def g(self) -> torch.Tensor | None:
        return self.grads[0] if self.grads else None

    def keep(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` (a tensor or a dict of tensors) computed once per forward pass from its second backward
        pass on: kept in ``cache`` while the shared element budget allows (``options["budget"]``: [elements
        left, backward passes done]; CACHE_BUDGET elements per forward pass). A forward pass followed by one
        backward pass keeps nothing."""
        if key in self.cache:
            return self.cache[key]
        value = make()
        budget = self.options.get("budget")
        size = sum(t.numel() for t in value.values()) if isinstance(value, dict) else value.numel()
        if budget is not None and budget[1] > 0 and budget[0] >= size:
            self.cache[key] = value
            budget[0] -= size
        return value


@dataclass
class Factor:
    """A per-sample gradient Σ_t r_t c_tᵀ (a matrix of shape (rows, cols) per sample). ``rows`` is dense
    (N, T, rows) or, for an embedding, a (N, T) tensor of row indices (one-hot rows of size ``size``);
    ``cols`` is (N, T, cols). ``transpose`` marks a weight stored as (cols, rows) (Hugging Face's Conv1D)."""

    rows: torch.Tensor
    cols: torch.Tensor
    size: int
    transpose: bool = False

    @property
    def indexed(self) -> bool:
        return not self.rows.is_floating_point()


class Rule(Protocol):
    name: str

    def applies(self, m: nn.Module) -> bool: ...

    def params(self, m: nn.Module) -> dict[str, nn.Parameter]: ...

    def norms(self, rec: Record) -> dict[str, torch.Tensor]: ...

    def grads(self, rec: Record) -> dict[str, Factor | torch.Tensor] | None: ...


class LayerRule(abc.ABC):
    """Base of the rules: one module class, its own parameters; the engine records the gradient at the first
    floating-point tensor the module returns (MultiheadAttention: the attention output, not the weights)."""

    name = "layer"
    classes: tuple[type, ...] = ()
    param_names: tuple[str, ...] = ("weight", "bias")

    def applies(self, m: nn.Module) -> bool:
        # a subclass that overrides forward (or adds parameters) computes something else: no rule for it
        if not any(type(m).forward is c.forward for c in self.classes):
            return False
        return all(k in self.param_names for k, _ in m.named_parameters(recurse=False))

    def params(self, m: nn.Module) -> dict[str, nn.Parameter]:
        return dict(m.named_parameters(recurse=False))

    @abc.abstractmethod
    def norms(self, rec: Record) -> dict[str, torch.Tensor]:
        """{parameter name: (n,) per-sample squared gradient norms} of one recorded use of the module."""

    def grads(self, rec: Record) -> dict[str, Factor | torch.Tensor] | None:
        return None  # no cheap per-sample gradients: tied uses go through the module-local fallback


RULES: list[Rule] = []


def register(rule: Rule) -> Rule:
    """Add a rule to the registry (the first rule that applies to a module wins)."""
    RULES.append(rule)
    return rule


def rule_for(m: nn.Module) -> Rule | None:
    """The registered rule for a module, or None (the module-local fallback then)."""
    for rule in RULES:
        if rule.applies(m):
            return rule
    return None


def dense(rep: Factor | torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The (N, *shape) per-sample gradients of a factor (or a dense tensor, reshaped)."""
    if isinstance(rep, torch.Tensor):
        return rep.reshape(rep.shape[0], *shape)
    n, c = rep.cols.shape[0], rep.cols.shape[-1]
    if rep.indexed:
        out = rep.cols.new_zeros(n, rep.size, c)
        out.scatter_add_(1, rep.rows.unsqueeze(-1).expand(-1, -1, c), rep.cols)
    else:
        out = torch.einsum("ntr,ntc->nrc", rep.rows, rep.cols)
    if rep.transpose:
        out = out.transpose(1, 2)
    return out.reshape(n, *shape)


def inner(x: Factor | torch.Tensor, y: Factor | torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-sample ⟨G_i^x, G_i^y⟩ of two uses of one parameter, (N,).

    Two factors: Σ_{t,s} ⟨r_t, r'_s⟩⟨c_t, c'_s⟩, where ⟨e_j, e_k⟩ = [j = k] for embedding rows and
    ⟨e_j, r⟩ = r[j] — the ghost norm's cross term, no per-sample gradient formed.
    """
    if isinstance(x, Factor) and isinstance(y, Factor) and x.transpose == y.transpose:
        cc = torch.bmm(x.cols, y.cols.transpose(1, 2))  # (N, T, S)
        if x.indexed and y.indexed:
            rr = (x.rows.unsqueeze(2) == y.rows.unsqueeze(1)).to(cc.dtype)
        elif x.indexed:
            rr = y.rows.gather(2, x.rows.unsqueeze(1).expand(-1, y.rows.shape[1], -1)).transpose(1, 2)
        elif y.indexed:
            rr = x.rows.gather(2, y.rows.unsqueeze(1).expand(-1, x.rows.shape[1], -1))
        else:
            rr = torch.bmm(x.rows, y.rows.transpose(1, 2))
        return (rr * cc).sum((1, 2))
    dx, dy = dense(x, shape), dense(y, shape)
    return (dx * dy).reshape(dx.shape[0], -1).sum(1)


# the rules, in the order they are tried
from gmix_curvature.curvature._rules import attention, conv, embedding, linear, norm  # noqa: E402, F401
