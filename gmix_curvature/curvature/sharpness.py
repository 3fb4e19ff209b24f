"""Scale-invariant sharpness: Σ_g ‖θ_g‖² · Tr(G_gg) over the parameter groups whose scale the network
ignores: θ_g → c·θ_g leaves the function unchanged (Eq. 5's G; theory/CURVATURE.md §5, theory/KERNELS.md).

Such a group's output reaches a normalisation layer (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm)
scaled by c and nowhere else, so ∂f/∂θ_g scales by 1/c and Tr(G_gg) by 1/c²: the block trace alone says
nothing about flatness, ‖θ_g‖² Tr(G_gg) is invariant. A group is the weight and bias of a layer feeding a
normalisation layer (a convolution before BatchNorm, a depthwise convolution before ConvNeXt's LayerNorm, a
query projection before a QK-norm), or a set of layers whose outputs are summed before one: in a pre-norm
transformer every layer reads the residual stream through a LayerNorm, so the embeddings and every layer
writing into the stream (attention output projections, second MLP layers) scale together. A layer whose
output is added to anything else (a residual connection, a bias) before the normalisation is not
scale-invariant alone and is not reported. The groups are found from the model by one traced forward pass
(hooks on the normalisation layers, a function mode following every tensor from the parameters), not
listed by hand. Issue 10, item 2; issue 15, item 4.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from gmix_curvature.curvature._data import as_batches, slice_input
from gmix_curvature.curvature._loss import Loss
from gmix_curvature.curvature._model import bn_mode_context, kernel_context, model_device_dtype
from gmix_curvature.curvature._outputs import OutputFn, call_model
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature.ggn import ggn_trace
from gmix_curvature.errors import GmixError

__all__ = ["scale_invariant_groups", "scale_invariant_sharpness", "NORM_LAYERS"]

NORM_LAYERS: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.InstanceNorm1d,
                                            nn.InstanceNorm2d, nn.InstanceNorm3d)


class _State(NamedTuple):
    """How a tensor changes when parameter groups are scaled: ``carrier`` — the one group (a union-find
    root) under whose scaling by c it scales by c; ``taint`` — groups on which it depends otherwise."""

    carrier: str | None
    taint: frozenset[str]


_CLEAN = _State(None, frozenset())
# Functions that move, copy or drop (eval-mode dropout) the values of their first argument: c·x in, c·(...) out.
_STRUCTURAL = frozenset("""permute reshape view view_as flatten unflatten transpose t contiguous squeeze unsqueeze
    __getitem__ expand expand_as clone movedim moveaxis swapaxes swapdims narrow select split chunk unbind tensor_split
    roll flip repeat tile to type_as float double detach neg __neg__ dropout dropout1d dropout2d dropout3d
    alpha_dropout feature_alpha_dropout""".split())
_SUM = frozenset("add __add__ __radd__ __iadd__ add_ sub __sub__ __isub__ sub_ cat concat concatenate stack".split())
_PRODUCT = frozenset("mul __mul__ __rmul__ __imul__ mul_ matmul __matmul__ __rmatmul__ bmm mm einsum".split())
_QUOTIENT = frozenset("div __truediv__ __itruediv__ div_ true_divide".split())
# weighted layers: output = layer(input; weight, bias), homogeneous of degree 1 in (weight, bias)
_LAYERS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                     F.conv_transpose3d, F.embedding})
_MHA_PARAMS = inspect.signature(F.multi_head_attention_forward)


class _Tracer(TorchFunctionMode):
    """Follows, for every tensor of one forward pass, its :class:`_State` (the dataflow of the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.params = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.parent = {name: name for name in self.params.values()}
        self.state: dict[int, _State] = {}
        self.keep: list[torch.Tensor] = []  # outputs stay alive so that their ids stay unique during the pass
        self.fed: set[str] = set()  # groups whose carrier reached a normalisation layer
        self.in_norm = 0
        self.handles = []
        for m in model.modules():
            if isinstance(m, NORM_LAYERS):
                self.handles.append(m.register_forward_pre_hook(self._norm_in))
                self.handles.append(m.register_forward_hook(self._norm_out))

    def find(self, g: str) -> str:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, groups: list[str]) -> str:
        roots = [self.find(g) for g in groups]
        for r in roots[1:]:
            self.parent[r] = roots[0]
        return roots[0]

    def of(self, t: Any) -> _State:
        if not isinstance(t, torch.Tensor):
            return _CLEAN
        if id(t) in self.params:
            return _State(self.params[id(t)], frozenset())
        s = self.state.get(id(t), _CLEAN)
        return _State(s.carrier and self.find(s.carrier), frozenset(self.find(g) for g in s.taint))

    def _set(self, out: Any, s: _State) -> None:
        for t in _tensors(out):
            if id(t) not in self.params:
                self.state[id(t)] = s
                self.keep.append(t)

    def _norm_in(self, module: nn.Module, inputs: tuple) -> None:
        s = self.of(inputs[0]) if inputs else _CLEAN
        if s.carrier is not None and s.carrier not in s.taint:
            self.fed.add(s.carrier)
        module._gmix_norm_state = _State(None, s.taint)
        self.in_norm += 1

    def _norm_out(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.in_norm -= 1
        self._set(output, module.__dict__.pop("_gmix_norm_state", _CLEAN))  # invariant to its input's scale

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.in_norm and _tensors(out):
            s = self._propagate(func, args, kwargs)
            if s is not None:
                self._set(out, s)
        return out

    def _propagate(self, func: Any, args: tuple, kwargs: dict) -> _State | None:
        states = [self.of(t) for t in _tensors((args, kwargs))]
        if all(s == _CLEAN for s in states):
            return None
        name = getattr(func, "__name__", "")
        taint = frozenset().union(*(s.taint for s in states))
        carriers = [s.carrier for s in states if s.carrier is not None]
        if func is F.embedding and (args[3] if len(args) > 3 else kwargs.get("max_norm")) is not None:
            return _State(None, taint | frozenset(carriers))  # renormalised rows: not homogeneous
        if func in _LAYERS or func is F.multi_head_attention_forward or func is torch.addmm:
            return self._layer(func, args, kwargs)
        if name in _STRUCTURAL and len(carriers) <= 1 and all(s.carrier is None for s in states[1:]):
            return self._clean_of(states[0].carrier, taint)
        if name in _SUM:
            operands = args[0] if name in ("cat", "concat", "concatenate", "stack") else args[:2]
            numbers = [a for a in operands if not isinstance(a, torch.Tensor)]
            op_states = [self.of(a) for a in operands if isinstance(a, torch.Tensor)]
            if not numbers and op_states and all(s.carrier is not None for s in op_states):
                return self._clean_of(self.union([s.carrier for s in op_states]), taint)
        if name in _PRODUCT | _QUOTIENT and len(carriers) == 1:
            scaled = [s for s in states if s.carrier is not None]
            if name not in _QUOTIENT or states[0] is scaled[0]:
                return self._clean_of(carriers[0], taint)
        return _State(None, taint | frozenset(carriers))

    def _clean_of(self, carrier: str | None, taint: frozenset[str]) -> _State:
        """A carrier of ``carrier`` unless the tensor also depends on that group otherwise."""
        if carrier is None or carrier not in taint:
            return _State(carrier, taint)
        return _State(None, taint)

    def _layer(self, func: Any, args: tuple, kwargs: dict) -> _State:
        """A weighted layer: a carrier of its (weight, bias) when they are trainable parameters."""
        if func is F.multi_head_attention_forward:  # output = out_proj(attention(q, k, v; in_proj)), need_weights
            bound = _MHA_PARAMS.bind(*args, **kwargs).arguments
            weight, bias = bound.get("out_proj_weight"), bound.get("out_proj_bias")
            inputs = [v for k, v in bound.items() if k not in ("out_proj_weight", "out_proj_bias")]
        elif func is torch.addmm:  # bias + x @ weight (Hugging Face's Conv1D in GPT-2)
            bias, inputs, weight = args[0], [args[1]], args[2]
        else:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = (args[2] if len(args) > 2 else kwargs.get("bias")) if func is not F.embedding else None
            inputs = [args[0]] + list(args[3:]) + [v for k, v in kwargs.items() if k not in ("weight", "bias")]
        in_state = [self.of(t) for t in _tensors(inputs)]
        taint = frozenset().union(*(s.taint | ({s.carrier} if s.carrier else set()) for s in in_state))
        own = [t for t in (weight, bias) if t is not None]
        if not own or not all(isinstance(t, torch.Tensor) and id(t) in self.params for t in own):
            return _State(None, taint | frozenset(self.of(t).carrier for t in own if self.of(t).carrier))
        return self._clean_of(self.union([self.params[id(t)] for t in own]), taint)

    def groups(self, output: Any) -> list[list[str]]:
        """The groups fed to a normalisation layer on which the model's output does not depend."""
        fed = {self.find(g) for g in self.fed}
        escaped = set()
        for t in _tensors(output):
            s = self.of(t)
            escaped |= s.taint | ({s.carrier} if s.carrier else set())
        members: dict[str, list[str]] = {}
        for name in self.params.values():
            root = self.find(name)
            if root in fed and root not in escaped:
                members.setdefault(root, []).append(name)
        return list(members.values())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, tuple | list):
        return [t for v in obj for t in _tensors(v)]
    return []


def _group_name(model: nn.Module, names: list[str]) -> str:
    """The modules owning a group's parameters, joined by '+' (a parameter a container owns by its own name)."""
    owners: dict[str, None] = {}
    modules = dict(model.named_modules())
    for p in names:
        owner, _, leaf = p.rpartition(".")
        m = modules[owner]
        only_weights = set(n for n, _ in m.named_parameters(recurse=False)) <= {"weight", "bias"}
        owners[owner if only_weights and owner else p] = None
    labels = list(owners)
    return "+".join(labels) if len(labels) <= 3 else f"{'+'.join(labels[:2])}+{len(labels) - 2} more"


def scale_invariant_groups(model: nn.Module, x: Any) -> dict[str, list[str]]:
    """{group name: its trainable parameter names} for every group of parameters whose joint rescaling
    θ_g → c·θ_g leaves the model's output unchanged (see the module docstring), found by running ``model``
    on ``x`` (a batch-first tensor or a mapping of them, ``model(**x)``) in a traced forward pass. A group is
    named by the layers owning it, joined by '+'.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    >>> scale_invariant_groups(net, torch.zeros(2, 1, 5, 5))
    {'0': ['0.weight', '0.bias']}
    >>> class PostNorm(nn.Module):  # a residual add before the LayerNorm: not invariant
    ...     def __init__(self):
    ...         super().__init__(); self.fc, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)
    ...     def forward(self, x):
    ...         return self.ln(x + self.fc(x))
    >>> scale_invariant_groups(PostNorm(), torch.zeros(2, 4))
    {}
    """
    tracer = _Tracer(model)
    try:
        with torch.no_grad(), kernel_context(), tracer:
            output = call_model(model, x)
    finally:
        tracer.remove()
    out = {}
    for names in tracer.groups(output):
        out[_group_name(model, names)] = names
    return out



def scale_invariant_sharpness(
    model: nn.Module,
    data: Any,
    *,
    method: str = "exact",
    bn_mode: str = "eval",
    batch_size: int | None = None,
    loss: str | Loss = "cross_entropy",
    ignore_index: int = -100,
    output_fn: OutputFn | None = None,
    **kwargs: Any,
) -> CurvatureResult:
    """Σ_l ‖θ_l‖² Tr(G_ll) over the scale-invariant groups (see the module docstring), G of Eq. 5.

    ``method`` and ``kwargs`` go to :func:`ggn_trace`, whose block traces are used (stochastic methods
    give a standard error, propagated assuming independent blocks). ``extra["groups"]`` lists, per
    group, its parameters, ‖θ_l‖², Tr(G_ll) and their product; ``extra["ggn_trace"]`` is the total.
    ``loss``, ``ignore_index`` and ``output_fn`` are :func:`ggn_trace`'s: sequence outputs, padding, mean
    squared error and sigmoid cross-entropy, Hugging Face outputs (G the mean over the counted predictions,
    theory/CURVATURE.md §8; ``extra["n_predictions"]`` says how many).

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    >>> r = scale_invariant_sharpness(net, (torch.randn(8, 3, dtype=torch.float64), torch.zeros(8, dtype=torch.int64)))
    >>> list(r.extra["groups"]), r.quantity
    (['0'], 'scale_invariant_sharpness')
    """
    start = time.perf_counter()
    device, dtype = model_device_dtype(model)
    first = next(iter(as_batches(data, batch_size=batch_size, device=device, dtype=dtype)), None)
    if first is None:
        raise GmixError("the data is empty: no samples to measure curvature on")
    with bn_mode_context(model, bn_mode):
        groups = scale_invariant_groups(model, slice_input(first[1], 0, 2))
    if not groups:
        raise GmixError("the model has no parameters feeding a normalisation layer alone (scaled by the same factor "
                        "and reaching the output by no other path): no scale-invariant groups")
    trace = ggn_trace(model, data, method, bn_mode=bn_mode, batch_size=batch_size, loss=loss,
                      ignore_index=ignore_index, output_fn=output_fn, **kwargs)  # fmt: skip
    params = dict(model.named_parameters())
    value, var, rows = 0.0, 0.0, {}
    for name, names in groups.items():
        norm2 = sum(float(params[p].detach().double().square().sum()) for p in names)
        block = sum(trace.per_param[p] for p in names)
        se2 = sum(trace.per_param_stderr.get(p, 0.0) ** 2 for p in names)
        rows[name] = {"params": names, "norm2": norm2, "trace": block, "product": norm2 * block}
        value += norm2 * block
        var += norm2**2 * se2
    stochastic = trace.stderr is not None
    return CurvatureResult(
        value=value, stderr=var**0.5 if stochastic else None, n_samples=trace.n_samples, n_probes=trace.n_probes,
        method=trace.method, bn_mode=bn_mode, seconds=time.perf_counter() - start,
        quantity="scale_invariant_sharpness",
        per_param={p: trace.per_param[p] for names in groups.values() for p in names},
        per_param_stderr={p: trace.per_param_stderr[p] for names in groups.values() for p in names
                          if p in trace.per_param_stderr},
        extra={"groups": rows, "ggn_trace": trace.value, "weight_norms2": {k: v["norm2"] for k, v in rows.items()},
               **{k: trace.extra[k] for k in ("loss", "n_predictions") if k in trace.extra}},  # fmt: skip
    )
