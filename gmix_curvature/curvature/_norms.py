"""Per-sample squared gradient norms ‖J_iᵀ v_i‖² of the surrogate loss Σ_i ⟨f_i, v_i⟩, per parameter.

This is the inner loop of every estimator built on per-sample norms (exact, fisher_mc, fisher_is,
output_hutchinson, the empirical Fisher). The output f_i may hold several predictions per sample (N, C),
(N, T, C), (N, C, d1, ...): the norm is of the gradient of the sum over the sample's positions, cross terms
between positions included. Two backends:

* ``"hooks"`` — per-layer rules (:mod:`._rules`) that never form per-sample gradients of the whole model.
  One forward pass records each layer call's input; each backward pass (one per output-space vector v)
  records the gradient at each layer's output, and each rule turns the pair into per-sample squared norms
  of that layer's own parameters: Linear over positions (ghost or materialised by operation count),
  Conv1d/Conv2d (ghost or materialised, unfolded inputs cached across passes up to ``CACHE_BUDGET``),
  LayerNorm, RMSNorm, GroupNorm, BatchNorm in eval mode, Embedding (ghost norm through token equality),
  nn.MultiheadAttention as one module (its ``out_proj`` is called functionally). Every other module that
  owns parameters goes to the module-local fallback (``torch.func`` on that module alone, from its recorded
  inputs and output gradient). Parameters that a non-leaf module uses in its own forward are either found on
  the first forward pass to be *used directly* (:class:`_Direct`: a bare position embedding ``x +
  self.pos[:t]``, the class token and position embedding of torchvision's and timm's ViTs, ConvNeXt's layer
  scale: the parameter's view is replaced by its expansion over the batch, whose gradient is the per-sample
  gradient), or go to the fallback on their module with only those parameters substituted.
  A parameter used more than once (tied weights, a module called twice) gets the per-sample gradients of
  all its uses summed before the square: Σ_u ‖G^(u)‖² + 2 Σ_{u<u'} ⟨G^(u), G^(u')⟩, the cross terms from
  the factored (ghost) forms of Linear and Embedding uses (no per-sample (V, d) tensor), else from dense
  per-sample gradients of the uses. A module called on a batch of 1 inside a batch of N (a position
  embedding on (1, T) ids) is taken to broadcast over the batch: its output is expanded to N (embeddings
  only: any other module computing a batch of 1, e.g. Swin V2's position-bias MLP on a buffer, sends the
  model to torch.func). The first forward pass watches every torch function (a ``TorchFunctionMode``) for
  a parameter used outside the forward of the modules routed to own it: a module that calls ``F.linear`` on
  its children's weights (torchvision's Swin attention) then goes whole to the fallback. Inputs of a
  recorded layer changed in place after it ran are refused (autograd saves nothing to catch it, since the
  parameters are frozen during the forward pass so that the backward passes form no weight gradients).
  ``routes`` says which path each module took.
* ``"func"`` — ``torch.func.vmap(grad)`` over samples of the whole model: any model whose samples are
  independent (one sample at a time where vmap refuses the forward: data-dependent control flow as in
  Hugging Face's attention-mask helpers, an operation without a batching rule as nn.LSTM). It is the
  reference of the tests. The module-local fallback likewise loops over samples where vmap refuses.

``"auto"`` takes the hooks unless the model cannot use them (a sequence-first module, ``batch_first=False``;
BatchNorm without running statistics; a parameter used by the top-level forward itself, outside every
module owning it; a non-embedding module computing a batch of 1), then ``torch.func`` (``reason`` says why).
Conventions of the hooks: every module sees the batch in dim 0; a tensor argument of a fallback module is
taken as batched when its dim 0 is the batch size; modules are deterministic (eval mode, or dropout 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from gmix_curvature.curvature._outputs import OutputFn, call_model, resolve_output_fn
from gmix_curvature.curvature._rules import Factor, Record, inner, rule_for
from gmix_curvature.curvature._rules.conv import CACHE_BUDGET, UNFOLD_BUDGET, conv_rule
from gmix_curvature.curvature._rules.functorch import fallback_grads, fallback_norms
from gmix_curvature.errors import GmixError

__all__ = ["PerSampleNorms", "BACKENDS", "CACHE_BUDGET", "conv_rule", "supports_hooks"]

BACKENDS = ("auto", "hooks", "func")
_UNFOLD_BUDGET = UNFOLD_BUDGET


class _Unsupported(Exception):
    """The model cannot take the hooks backend (the reason is the message)."""


class _Retry(Exception):
    """The first forward pass found parameters with a direct use (:class:`_Direct`): run it again."""


class _Stray(Exception):
    """Parameters used outside the modules routed to own them; ``holders``: the modules that must own them."""

    def __init__(self, message: str, holders: frozenset[str]) -> None:
        super().__init__(message)
        self.holders = holders


def _plan(
    model: nn.Module, params: dict[str, nn.Parameter], subtrees: frozenset[str] = frozenset()
) -> dict[str, tuple[str, Any, dict[str, str]]]:
    """{module name: (route, rule, {local parameter name: global name})} for the modules owning tracked
    parameters; raises _Unsupported where the hooks cannot apply. A module in ``subtrees`` uses its
    children's parameters in its own forward (torchvision's Swin attention calls ``F.linear`` on
    ``self.qkv.weight``): the fallback takes it whole, its parameters and all its descendants'."""
    names = {id(p): name for name, p in params.items()}  # the parameters asked for, frozen or not
    registered: dict[int, list[str]] = {}  # parameter -> the modules that register it
    for mname, m in model.named_modules():
        for p in m.parameters(recurse=False):
            registered.setdefault(id(p), []).append(mname)

    def below(mname: str, p: nn.Parameter) -> bool:
        """Also registered by a descendant (Hugging Face's head bias tied to its decoder's): its use is there."""
        return any(o != mname and (mname == "" or o.startswith(mname + ".")) for o in registered[id(p)])

    plan: dict[str, tuple[str, Any, dict[str, str]]] = {}
    claimed: set[str] = set()  # modules whose parameters an enclosing rule owns (MultiheadAttention.out_proj)
    for mname, m in model.named_modules():
        if getattr(m, "batch_first", True) is False:
            raise _Unsupported(f"module {mname or type(m).__name__!r} is sequence-first (batch_first=False)")
        if isinstance(m, _BatchNorm) and m.running_mean is None:
            raise _Unsupported(f"BatchNorm {mname!r} has no running statistics: its samples are not independent")
        if any(mname.startswith(c + ".") for c in claimed):
            continue
        if mname in subtrees:
            local = {k: names[id(p)] for k, p in m.named_parameters() if id(p) in names}
            if local:
                plan[mname] = ("fallback", None, local)
            claimed.add(mname)
            continue
        rule = rule_for(m)
        if rule is not None:
            local = {k: names[id(p)] for k, p in rule.params(m).items() if id(p) in names}
            if local:
                plan[mname] = (f"rule:{rule.name}", rule, local)
            if any(True for _ in m.children()):
                claimed.add(mname)
            continue
        own = m.named_parameters(recurse=False)
        local = {k: names[id(p)] for k, p in own if id(p) in names and not below(mname, p)}
        if not local:
            continue
        plan[mname] = ("fallback", None, local)
    return plan


def supports_hooks(model: nn.Module, params: dict[str, nn.Parameter]) -> bool:
    """Whether the hooks backend (per-layer rules and the module-local fallback) applies to the model."""
    try:
        _plan(model, params)
    except _Unsupported:
        return False
    return True


def _batch_size(x: Any) -> int:
    for t in _tensors(x):
        if t.dim() > 0:
            return int(t.shape[0])
    raise GmixError("the batch holds no batch-first tensor")


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


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


class _Watch(TorchFunctionMode):
    """Finds tracked parameters used by a torch function outside the forward of every module routed to own
    them (torchvision's Swin attention calling ``F.linear`` on ``self.qkv.weight``; a parent calling
    ``F.linear(h, self.embed.weight)``): the hooks would miss that use. ``stray`` maps each such parameter to
    the innermost module running at the time that holds an owner: the fallback must take that module whole."""

    def __init__(self, owners: dict[int, set[str]]) -> None:
        super().__init__()
        self.owners = owners
        self.stack: list[str] = []  # the names of the modules running, outermost first
        self.stray: dict[int, str] = {}

    def enter(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.stack.append(name)

        return hook

    def leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.stack.pop()

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self.owners:
                    owners = self.owners[id(t)]
                    if owners.isdisjoint(self.stack):
                        holders = [a for a in self.stack if any(a == "" or o.startswith(a + ".") for o in owners)]
                        self.stray[id(t)] = holders[-1] if holders else ""
        return out


# elementwise operations that broadcast their second operand over the first's batch dimension
_BROADCAST_OPS = frozenset(
    f"{pre}{op}{post}" for op in ("add", "sub", "mul", "div", "truediv") for pre, post in (("", ""), ("", "_"))
) | frozenset(f"__{r}{op}__" for op in ("add", "sub", "mul", "truediv") for r in ("", "r", "i"))
#: set False to send every parameter a non-leaf module uses directly to the module-local fallback
DETECT_DIRECT = True


def _distinct(t: torch.Tensor) -> bool:
    """Whether every element of the view ``t`` is a distinct element of its base (no expanded dimension)."""
    return all(st != 0 or sz <= 1 for st, sz in zip(t.stride(), t.shape)) and (
        torch._debug_has_internal_overlap(t) == 0
    )


class _Direct(TorchFunctionMode):
    """Parameters that a non-leaf module uses in its own forward, as a bare position embedding ``x +
    self.pos[:t]`` or a class token ``self.cls.expand(n, -1, -1)`` (timm's ViT, nanoGPT-like code).

    A use is *direct* when the parameter, or a view of it that holds each of its elements at most once
    (slicing, reshaping, transposing), is (a) broadcast by an elementwise operation (``+ - * /``) against a
    tensor whose dim 0 is the batch, or (b) expanded from a leading 1 to the batch size. Replacing the view
    by its expansion over the batch (a new leaf, shape (N, …)) changes no value, and the gradient of that
    leaf's slice i is sample i's gradient of the view: its squared norm is sample i's ‖∂/∂θ‖² (every element
    of the parameter appears at most once in the view). Without ``record`` the mode only classifies
    (``verdict``: name -> "direct" or why not); with it, it substitutes and calls ``record(name, leaf)``, and a
    use that is no longer direct raises. A parameter used more than once, or in any other way, keeps the
    module-local fallback."""

    def __init__(self, params: dict[int, tuple[str, torch.Tensor]], n: int,
                 record: Callable[[str, torch.Tensor], None] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.params, self.n, self.record = params, n, record
        self.roots = {name: t for name, t in params.values()}
        self.derived: dict[int, tuple[str, torch.Tensor]] = {}  # id(view) -> (name, view): kept alive here
        self.verdict: dict[str, str] = {}
        self.count: dict[str, int] = {}

    def _name(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.params.get(id(t)) or self.derived.get(id(t))
        return hit[0] if hit is not None and hit[1] is t else None

    def _reject(self, name: str, why: str) -> None:
        self.verdict[name] = why
        if self.record is not None:
            raise _Unsupported(f"parameter {name!r} is used by {why} (its use changed between batches)")

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        hits = [(self._name(t), t) for t in flat]
        hits = [(name, t) for name, t in hits if name is not None]
        if not hits:
            return func(*args, **kwargs)
        fname = getattr(func, "__name__", str(func))
        name, d = hits[0]
        if len(hits) > 1:
            for other, _ in hits:
                self._reject(other, f"{fname} with itself or another parameter")
            return func(*args, **kwargs)
        others = [t for t in flat if isinstance(t, torch.Tensor) and t is not d]
        root = self.roots[name]
        if fname == "expand" and not others:  # (b) a class token expanded over the batch
            out = func(*args, **kwargs)
            if d.dim() and d.shape[0] == 1 and out.dim() == d.dim() and out.shape[0] == self.n > 1 \
                    and out.shape[1:] == d.shape[1:] and _distinct(d):  # fmt: skip
                return self._use(name, d, tuple(out.shape), out)
            self._reject(name, f"expand to {tuple(out.shape)}")
            return out
        if fname in _BROADCAST_OPS and len(others) == 1:  # (a) broadcast against the batch
            x = others[0]
            inplace_on_view = args and args[0] is d and (fname.endswith("_") or fname.startswith("__i"))
            batched = x.dim() > 0 and x.shape[0] == self.n
            shape = (1,) * (x.dim() - d.dim()) + tuple(d.shape)
            if batched and not inplace_on_view and d.dim() <= x.dim() and shape[0] == 1 and _distinct(d):
                full = (self.n, *shape[1:])
                if self.record is None:
                    self._use(name, d, full, None)
                    return func(*args, **kwargs)
                e = self._use(name, d.detach().reshape(shape), full, None)
                swap = lambda t: e if t is d else t  # noqa: E731
                return func(*tree_map(swap, args), **tree_map(swap, kwargs))
            self._reject(name, f"{fname} (not broadcast over the batch)")
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not others and (out is d or out._base is root):  # a view: follow it
            self.derived[id(out)] = (name, out)
        elif any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            self._reject(name, fname)
        return out

    def _use(self, name: str, d: torch.Tensor, full: tuple[int, ...], out: torch.Tensor | None) -> Any:
        self.count[name] = self.count.get(name, 0) + 1
        if self.count[name] > 1:
            self._reject(name, "more than one operation")
        elif name not in self.verdict:
            self.verdict[name] = "direct"
        if self.record is None:
            return out
        e = d.detach().expand(full).requires_grad_()
        self.record(name, e)
        return e


class PerSampleNorms:
    """Per-sample squared gradient norms of Σ_i ⟨f_i, v_i⟩ for many v, one forward pass shared.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    >>> psn = PerSampleNorms(net, dict(net.named_parameters()))
    >>> logits = psn.forward(torch.randn(5, 3))
    >>> norms = psn.norms(torch.ones(5, 2))
    >>> sorted(norms), tuple(norms["0.weight"].shape), psn.routes["1"]
    (['0.bias', '0.weight', '1.bias', '1.weight', '2.bias', '2.weight'], (5,), 'rule:layer_norm')
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
        self.model, self.params, self.conv_rule = model, params, conv_rule
        self.output_fn = resolve_output_fn(output_fn)
        self.requested = backend
        self.reason: str | None = None  # why auto took torch.func
        self._plan: dict[str, tuple[str, Any, dict[str, str]]] = {}
        self._subtrees: frozenset[str] = frozenset()
        self._direct: dict[str, tuple[str, str]] = {}  # parameter -> (module, local name): used directly
        self._analysed = not DETECT_DIRECT
        if backend != "func":
            try:
                self._plan = _plan(model, params)
            except _Unsupported as exc:
                if backend == "hooks":
                    raise GmixError(f"the hooks backend cannot take this model: {exc}; use backend='func'") from None
                self.reason = str(exc)
        self.backend = "func" if backend == "func" or self.reason else "hooks"
        self._checked = False
        self._x: Any = None
        self._logits: torch.Tensor | None = None
        self._records: list[tuple[Record, str, Any, dict[str, str]]] = []
        self._stops: list[torch.Tensor] = []
        self._budget = [CACHE_BUDGET, 0]

    @property
    def routes(self) -> dict[str, str]:
        """{module name: "rule:<layer>" | "fallback"} of the hooks backend ({} for torch.func);
        a parameter that its non-leaf module uses directly (:class:`_Direct`) appears under its own name as
        "direct"."""
        if self.backend == "func":
            return {}
        return {**{name: r[0] for name, r in self._plan.items()}, **{name: "direct" for name in self._direct}}

    def _replan(self) -> None:
        """The plan for the current subtrees, less the parameters found to be used directly."""
        plan = _plan(self.model, self.params, self._subtrees)
        for name, (mname, k) in list(self._direct.items()):
            if mname in plan and plan[mname][2].get(k) == name:
                route, rule, local = plan[mname]
                local = {a: b for a, b in local.items() if a != k}
                if local:
                    plan[mname] = (route, rule, local)
                else:
                    del plan[mname]
            elif any(name in local.values() for _, _, local in plan.values()):
                del self._direct[name]  # a module taken whole by the fallback (a subtree) owns it now
        self._plan = plan

    # forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run the model on a batch (a batch-first tensor, or a mapping of them passed as ``model(**x)``) and
        keep what the backward passes need; returns ``output_fn`` of the output, detached, of any shape."""
        # the previous batch's graph goes before this batch's is built (else both are alive at the peak)
        self._records, self._stops, self._logits, self._x = [], [], None, None
        if self.backend == "hooks":
            try:
                while True:
                    try:
                        return self._hooked_forward(x)
                    except _Retry:  # the first pass's graph goes before the second is built
                        self._records, self._stops, self._logits, self._x = [], [], None, None
                    except _Stray as exc:  # a module using its children's parameters: the fallback takes it whole
                        self._records, self._stops, self._logits, self._x = [], [], None, None
                        if "" in exc.holders or exc.holders <= self._subtrees:
                            raise _Unsupported(str(exc)) from None
                        self._subtrees = self._subtrees | exc.holders
                        self._replan()
            except _Unsupported as exc:
                self._records, self._stops = [], []
                if self.requested == "hooks":
                    raise GmixError(f"the hooks backend cannot take this model: {exc}; use backend='func'") from None
                self.reason, self.backend = str(exc), "func"
        self._x = x
        with torch.no_grad():
            self._logits = self.output_fn(call_model(self.model, x))
        return self._logits

    def _hooked_forward(self, x: Any) -> torch.Tensor:
        n = _batch_size(x)
        # [elements left, backward passes done]: what the rules keep across the backward passes of this forward
        budget = self._budget = [CACHE_BUDGET, 0]
        modules = dict(self.model.named_modules())

        def post_hook(mname: str) -> Callable:
            route, rule, local = self._plan[mname]

            def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
                flat, spec = tree_flatten(out)
                slots = [j for j, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]
                if rule is not None:
                    slots = slots[:1]
                if not slots:
                    return None
                expand = False
                for j in slots:
                    t = flat[j]
                    if t.dim() == 0 or t.shape[0] not in (n, 1):
                        raise _Unsupported(f"module {mname!r} returned shape {tuple(t.shape)} for a batch of {n}")
                    expand = expand or (t.shape[0] == 1 and n > 1)
                if expand and getattr(rule, "name", None) != "embedding":
                    raise _Unsupported(f"module {mname!r} computes a batch of 1 inside a batch of {n}")
                rec_args, rec_kwargs = tree_map(_detach, args), tree_map(_detach, kwargs)
                if expand:
                    rec_args = tuple(a.expand(n, *a.shape[1:]) if isinstance(a, torch.Tensor) and a.dim() > 0
                                     and a.shape[0] == 1 else a for a in rec_args)  # fmt: skip
                # the recorded inputs share their version counters with the model's: an in-place change after
                # this call (which autograd does not catch once the parameters need no gradient) is found
                versions = [(t, t._version) for t in tree_flatten((rec_args, rec_kwargs))[0]
                            if isinstance(t, torch.Tensor)]  # fmt: skip
                rec = Record(m, rec_args, rec_kwargs, n, grads=[None] * len(slots), cache={},
                             options={"conv_rule": self.conv_rule, "budget": budget, "versions": versions,
                                      "name": mname})  # fmt: skip
                for i, j in enumerate(slots):
                    t = flat[j]
                    if not t.requires_grad:  # fed by no leaf (token ids, a buffer): its output is a leaf
                        t = t.detach().requires_grad_()
                        self._stops.append(t)
                    if t.shape[0] == 1 and n > 1:
                        t = t.expand(n, *t.shape[1:])
                        t.register_hook(self._slot(rec, i))
                    else:
                        t.register_hook(self._slot(rec, i))
                        if t.is_leaf:
                            t = t.clone()  # consumers may modify it in place (ReLU(inplace=True)); a leaf can't be
                    flat[j] = t
                self._records.append((rec, route, rule, local))
                return tree_unflatten(flat, spec)

            return hook

        handles = []
        for mname in self._plan:
            m = modules[mname]
            handles.append(m.register_forward_hook(post_hook(mname), with_kwargs=True))
        frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        direct, candidates = None, {}
        if not self._analysed:  # the parameters of non-leaf modules on the fallback: any used directly?
            for mname, (route, _, local) in self._plan.items():
                m = modules[mname]
                if route == "fallback" and mname not in self._subtrees and any(True for _ in m.children()):
                    candidates.update({id(m.get_parameter(k)): (name, m.get_parameter(k), mname, k)
                                       for k, name in local.items()})  # fmt: skip
            if candidates:
                direct = _Direct({i: c[:2] for i, c in candidates.items()}, n)
        elif self._direct:

            def record(name: str, e: torch.Tensor) -> None:
                mname, k = self._direct[name]
                rec = Record(modules[mname], (), {}, n, grads=[None])
                e.register_hook(self._slot(rec, 0))
                self._stops.append(e)
                self._records.append((rec, "direct", None, {k: name}))

            tracked = {id(p): (name, p) for name, p in self.params.items() if name in self._direct}
            direct = _Direct(tracked, n, record)
        watch = None
        if not self._checked:
            owners: dict[int, set[str]] = {}
            for mname, (_, _, local) in self._plan.items():
                m = modules[mname]
                for k in local:
                    owners.setdefault(id(m.get_parameter(k)), set()).add(mname)
            watch = _Watch(owners)
            for mname, m in modules.items():
                handles.append(m.register_forward_pre_hook(watch.enter(mname), prepend=True))
                handles.append(m.register_forward_hook(watch.leave))
        try:
            for p, _ in frozen:  # params frozen: the backward reaches only the stopping set, no weight gradients
                p.requires_grad_(False)
            self._x = _leaves(x)
            self._stops.extend(t for t in _tensors(self._x) if t.requires_grad)
            with torch.enable_grad(), watch or contextlib.nullcontext(), direct or contextlib.nullcontext():
                self._logits = self.output_fn(call_model(self.model, self._x))
        finally:
            for h in handles:
                h.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
        if candidates:
            self._analysed = True
            found = {c[0]: c[2:] for c in candidates.values() if direct.verdict.get(c[0]) == "direct"}
            if found:
                self._direct.update(found)
                self._replan()
                raise _Retry
        if watch is not None:
            if watch.stray:
                names = {id(p): name for name, p in self.params.items()}
                stray = sorted(names.get(i, "?") for i in watch.stray)
                raise _Stray(f"parameter {stray[0]!r} is used outside the forward of the module owning it",
                             frozenset(watch.stray.values()))  # fmt: skip
            self._checked = True
        return self._logits.detach()

    @staticmethod
    def _slot(rec: Record, i: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            rec.grads[i] = grad.detach()

        return hook

    # norms -------------------------------------------------------------------------------------
    def norms(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """{parameter name: (n,) tensor of ‖∂⟨f_i, v_i⟩/∂θ_l‖²} for the batch of the last :meth:`forward`.

        ``v`` has the shape of the output; for several positions per sample (N, T, C) the norm is of the sum
        over the sample's positions, cross terms between positions included. Tied weights: the per-sample
        gradients of all uses are summed before the square."""
        if self._logits is None:
            raise RuntimeError("call forward() first")
        if tuple(v.shape) != tuple(self._logits.shape):
            raise GmixError(f"v has shape {tuple(v.shape)}, the model's output {tuple(self._logits.shape)}")
        if self.backend == "func":
            return self._func_norms(v)
        for rec, *_ in self._records:
            rec.grads = [None] * len(rec.grads)
        if self._stops and self._logits.requires_grad:
            torch.autograd.grad(self._logits, self._stops, grad_outputs=v.to(self._logits.dtype), retain_graph=True,
                                allow_unused=True)  # fmt: skip
        with torch.no_grad():
            out = self._assemble(v)
        self._budget[1] += 1
        return out

    def _assemble(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        n = v.shape[0]
        uses: dict[str, list[tuple[int, str]]] = {}
        for r, (_, _, _, local) in enumerate(self._records):
            for k, name in local.items():
                uses.setdefault(name, []).append((r, k))
        norm_cache: dict[int, dict[str, torch.Tensor]] = {}
        grad_cache: dict[int, dict[str, Factor | torch.Tensor]] = {}

        for rec, *_ in self._records:
            if any(t._version != version for t, version in rec.options.get("versions", ())):
                raise GmixError(f"the input of module {rec.options['name']!r} was modified in place after the module "
                                "ran; the hooks cannot see its value: use backend='func'")  # fmt: skip

        def norms_of(r: int) -> dict[str, torch.Tensor]:
            if r not in norm_cache:
                rec, route, rule, local = self._records[r]
                if all(g is None for g in rec.grads):
                    norm_cache[r] = {k: v.new_zeros(n) for k in local}
                elif route == "direct":  # the gradient of the parameter's view expanded over the batch
                    norm_cache[r] = {k: rec.g.reshape(n, -1).square().sum(1) for k in local}
                elif rule is not None:
                    norm_cache[r] = rule.norms(rec)
                else:
                    norm_cache[r] = fallback_norms(rec, list(local))
            return norm_cache[r]

        def grads_of(r: int) -> dict[str, Factor | torch.Tensor]:
            if r not in grad_cache:
                rec, route, rule, local = self._records[r]
                got = None
                if all(g is None for g in rec.grads):
                    got = {k: torch.zeros(n, *self.params[name].shape, dtype=v.dtype, device=v.device)
                           for k, name in local.items()}  # fmt: skip
                elif route == "direct":  # never asked: a direct parameter has one use, so no cross terms
                    got = {k: rec.g for k in local}
                elif rule is not None:
                    got = rule.grads(rec)
                grad_cache[r] = got if got is not None else fallback_grads(rec, list(local))
            return grad_cache[r]

        out: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            us = uses.get(name, [])
            if not us:
                out[name] = v.new_zeros(n)
                continue
            total = sum(norms_of(r)[k] for r, k in us)
            for a in range(len(us)):
                for b in range(a + 1, len(us)):
                    (ra, ka), (rb, kb) = us[a], us[b]
                    total = total + 2 * inner(grads_of(ra)[ka], grads_of(rb)[kb], p.shape)
            out[name] = total
        return out

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

        try:
            per_sample = vmap(grad(surrogate), in_dims=(None, 0, 0), chunk_size=64)(detached, batched, v)
        except RuntimeError:  # no batching rule (LSTM), data-dependent control flow (Hugging Face's mask helpers)
            rows = [grad(surrogate)(detached, tree_map(lambda t, i=i: t[i], batched), v[i]) for i in range(v.shape[0])]
            per_sample = {k: torch.stack([r[k] for r in rows]) for k in names}
        return {k: per_sample[k].reshape(v.shape[0], -1).square().sum(1) for k in names}
