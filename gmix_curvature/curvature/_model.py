"""Model plumbing: the BatchNorm mode of an estimate, the routing around fused kernels, the trainable
parameters, the functional forward.

Every estimator runs inside :func:`bn_mode_context`, which also routes around the kernels PyTorch ships
without the derivatives curvature needs (theory/KERNELS.md): fused attention (the flash / memory-efficient
``scaled_dot_product_attention`` kernels and ``nn.MultiheadAttention``'s / ``nn.TransformerEncoderLayer``'s
fast path have neither a forward-mode derivative, which Jacobian-vector products use, nor a second
derivative, which Hessian-vector products use) and ``hardsigmoid`` (no second derivative). Where a
product still meets such an operation, the error names the layer in one line.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gmix_curvature.errors import GmixError

__all__ = [
    "BN_MODES",
    "bn_mode_context",
    "kernel_context",
    "trainable",
    "has_batchnorm",
    "check_bn_mode",
    "model_device_dtype",
]

BN_MODES = ("eval", "train")

# PyTorch's messages when an operation lacks the derivative a product needs: (pattern, what is missing).
_MISSING = (
    (re.compile(r"derivative for (?:aten::)?([\w.]+) is not implemented"), "second derivative"),
    (re.compile(r"Trying to use forward AD with (?:aten::)?([\w.]+) that does not support it"),
     "forward-mode derivative"),
)
_ONCE_DIFFERENTIABLE = "marked with @once_differentiable"


def check_bn_mode(bn_mode: str) -> str:
    if bn_mode not in BN_MODES:
        raise GmixError(f"unknown bn_mode {bn_mode!r}; valid: {', '.join(BN_MODES)}")
    return bn_mode


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _hardsigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """relu6(x + 3) / 6: hardsigmoid's values and first derivative (zero outside the open interval (-3, 3),
    as ``hardsigmoid_backward``), and a second derivative (zero), which ``hardsigmoid_backward`` lacks.
    Always out of place (an in-place result would break the graph this is for)."""
    return F.relu6(x + 3) / 6


class _TwiceDifferentiable(TorchFunctionMode):
    """Calls of the listed functions (module or functional) go to a twice-differentiable composition."""

    REPLACE = {F.hardsigmoid: _hardsigmoid, torch._C._nn.hardsigmoid: _hardsigmoid}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        return self.REPLACE.get(func, func)(*args, **kwargs)


@contextlib.contextmanager
def kernel_context() -> Iterator[None]:
    """Route around kernels without forward-mode or second derivatives for the duration, global state
    restored on exit: ``scaled_dot_product_attention`` on its math kernel only, the fast path of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` off, ``hardsigmoid`` as ``relu6(x+3)/6``.
    All three compute the same function (the fused kernels to rounding, hardsigmoid exactly).

    >>> torch.backends.mha.get_fastpath_enabled()
    True
    >>> with kernel_context():
    ...     torch.backends.mha.get_fastpath_enabled()
    False
    >>> torch.backends.mha.get_fastpath_enabled()
    True
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH), _TwiceDifferentiable():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def bn_mode_context(model: nn.Module, bn_mode: str = "eval", *, route_kernels: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration (dropout off, the model's modes restored on exit),
    inside :func:`kernel_context` (``route_kernels=False``: the fused kernels stay, for code that needs first
    derivatives only and would rather keep their speed; the one-line errors stay).

    ``bn_mode="eval"``: BatchNorm uses its running statistics, so per-sample terms are independent.
    ``bn_mode="train"``: BatchNorm normalises with the statistics of the batch (batch-coupled terms);
    its running statistics are set aside for the duration, so nothing is updated.

    An operation without the derivative a product needs (forward-mode for Jacobian-vector products,
    second for Hessian-vector products) raises a one-line :class:`GmixError` naming the layer it sits in.
    """
    check_bn_mode(bn_mode)
    flags = {m: m.training for m in model.modules()}
    saved: dict[nn.Module, tuple] = {}
    seen = _FirstInput(model)
    try:
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    saved[m] = (m.running_mean, m.running_var, m.num_batches_tracked)
                    m.running_mean = m.running_var = m.num_batches_tracked = None
        with kernel_context() if route_kernels else contextlib.nullcontext():
            try:
                yield model
            except (RuntimeError, NotImplementedError) as err:
                message = _missing_derivative(model, err, seen)
                if message is None:
                    raise
                raise GmixError(message) from None
    finally:
        seen.remove()
        for m, (mean, var, count) in saved.items():
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
        for m, flag in flags.items():
            m.training = flag


class _FirstInput:
    """The first plain (untransformed) input the model is called with, kept to locate a failing layer."""

    def __init__(self, model: nn.Module) -> None:
        self.args: tuple | None = None
        self.kwargs: dict = {}
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.args is None and all(_plain(t) for t in _tensors((args, kwargs))):
            self.args, self.kwargs = args, kwargs

    def remove(self) -> None:
        self.handle.remove()
        self.args, self.kwargs = None, {}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _plain(t: torch.Tensor) -> bool:
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


class _OpRecorder(TorchDispatchMode):
    """Which modules' forward passes run which ATen operations (innermost module on the stack)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.where: dict[str, str] = {}
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            self.stack.append(name)

        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        op = func._schema.name.split("::")[-1]
        if self.stack:
            self.where.setdefault(op, self.stack[-1])
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# Modules whose fused paths run these operations: the layer named when recording the operations does not find
# it (a dispatch mode makes nn.TransformerEncoderLayer leave its fast path, for one).
_FUSED_BY = {"_transformer_encoder_layer_fwd": nn.TransformerEncoderLayer,
             "_native_multi_head_attention": nn.MultiheadAttention}


def _layer_running(model: nn.Module, op: str, seen: _FirstInput) -> str | None:
    """The (innermost) module whose forward pass runs ``op`` on the model's first input, or None."""
    found = _layer_recorded(model, op, seen)
    if found is None and op in _FUSED_BY:
        name = next((n for n, m in model.named_modules() if isinstance(m, _FUSED_BY[op])), None)
        found = None if name is None else f"{name or '(the model)'!r} ({type(model.get_submodule(name)).__name__})"
    return found


def _layer_recorded(model: nn.Module, op: str, seen: _FirstInput) -> str | None:
    if seen.args is None:
        return None
    candidates = {op, re.sub(r"_backward$", "", op), re.sub(r"_(backward|forward)$", "", op)}
    recorder = _OpRecorder(model)
    try:
        for grad_mode in (False, True):  # fused paths depend on whether autograd records
            with torch.set_grad_enabled(grad_mode), recorder:
                model(*seen.args, **seen.kwargs)
            for name in candidates:
                if name in recorder.where:
                    layer = recorder.where[name]
                    return f"{layer or '(the model)'!r} ({type(model.get_submodule(layer)).__name__})"
    except Exception:  # noqa: BLE001 - locating the layer is best effort; the error names the operation anyway
        return None
    finally:
        recorder.remove()
    return None


def _once_differentiable_layer(model: nn.Module, seen: _FirstInput) -> tuple[str, str] | None:
    """The innermost module whose output comes from an autograd.Function with a once-differentiable backward."""
    if seen.args is None:
        return None
    found: list[tuple[str, str]] = []

    def hook(name: str):  # noqa: ANN202
        def check(module: nn.Module, args: tuple, output: Any) -> None:
            fn = getattr(output, "grad_fn", None)
            cls = getattr(fn, "_forward_cls", None)
            if not found and cls is not None and hasattr(cls.backward, "__wrapped__"):
                found.append((f"{name!r} ({type(module).__name__})", cls.__name__))

        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.enable_grad():
            model(*seen.args, **seen.kwargs)
    except Exception:  # noqa: BLE001 - best effort, as _layer_running
        return None
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _missing_derivative(model: nn.Module, err: BaseException, seen: _FirstInput) -> str | None:
    """The one-line message for an operation without the derivative a product needs, or None."""
    text = str(err)
    if _ONCE_DIFFERENTIABLE in text:
        found = _once_differentiable_layer(model, seen)
        where = f"layer {found[0]}: its autograd.Function {found[1]}" if found else "an autograd.Function of the model"
        return (f"{where} is marked @once_differentiable, so it has no second derivative; use a method built on "
                "per-sample norms (exact, fisher_is, output_hutchinson)")
    for pattern, missing in _MISSING:
        found = pattern.search(text)
        if found:
            op = found.group(1).split(".")[0]
            layer = _layer_running(model, op, seen)
            where = f"layer {layer}" if layer else "a layer of the model"
            return (f"{where}: aten::{op} has no {missing} in PyTorch, so this product cannot be formed "
                    f"through it; use a method built on per-sample norms (exact, fisher_is, output_hutchinson)")
    return None


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters θ of G(θ): those with ``requires_grad``, by name (shared tensors once)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise GmixError("the model has no trainable parameters")
    return params


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()))
    return p.device, p.dtype
