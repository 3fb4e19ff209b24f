"""Scale-invariant sharpness: Σ_l ‖θ_l‖² · Tr(G_ll) over the parameter groups whose scale the network
ignores — the weight and bias of a layer whose output feeds a normalisation layer directly.

Scaling such a group by α leaves the (batch-normalised) function unchanged, so ∂f/∂θ_l scales by 1/α
and Tr(G_ll) by 1/α²: the block trace alone says nothing about flatness, ‖θ_l‖² Tr(G_ll) is invariant.
The groups are found from the model by one traced forward pass with hooks (which module's output is the
input of which normalisation layer), not listed by hand. Issue 10, item 2.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gmix_curvature.curvature._data import as_batches
from gmix_curvature.curvature._model import bn_mode_context, model_device_dtype
from gmix_curvature.curvature._result import CurvatureResult
from gmix_curvature.curvature.ggn import ggn_trace
from gmix_curvature.errors import GmixError

__all__ = ["scale_invariant_groups", "scale_invariant_sharpness", "NORM_LAYERS"]

NORM_LAYERS: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
                                            nn.InstanceNorm2d, nn.InstanceNorm3d)


def scale_invariant_groups(model: nn.Module, x: torch.Tensor) -> dict[str, list[str]]:
    """{module name: [its trainable parameter names]} for every module whose output is, unchanged, the
    input of a normalisation layer, found by running ``model`` on ``x`` with hooks.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    >>> scale_invariant_groups(net, torch.zeros(2, 1, 5, 5))
    {'0': ['0.weight', '0.bias']}
    """
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold the outputs so that their ids stay unique during the pass
    fed: dict[str, None] = {}
    handles = []
    param_names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    owners = {name: m for name, m in model.named_modules()}

    def out_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name
                keep.append(output)

        return hook

    def norm_hook(module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and id(inputs[0]) in produced:
            fed[produced[id(inputs[0])]] = None

    for name, m in model.named_modules():
        if isinstance(m, NORM_LAYERS):
            handles.append(m.register_forward_pre_hook(norm_hook))
        elif any(p.requires_grad for p in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(out_hook(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    groups = {}
    for name in fed:
        names = [param_names[id(p)] for p in owners[name].parameters(recurse=False) if id(p) in param_names]
        if names:
            groups[name] = names
    return groups


def scale_invariant_sharpness(
    model: nn.Module,
    data: Any,
    *,
    method: str = "exact",
    bn_mode: str = "eval",
    batch_size: int | None = None,
    **kwargs: Any,
) -> CurvatureResult:
    """Σ_l ‖θ_l‖² Tr(G_ll) over the scale-invariant groups (see the module docstring), G of Eq. 5.

    ``method`` and ``kwargs`` go to :func:`ggn_trace`, whose block traces are used (stochastic methods
    give a standard error, propagated assuming independent blocks). ``extra["groups"]`` lists, per
    group, its parameters, ‖θ_l‖², Tr(G_ll) and their product; ``extra["ggn_trace"]`` is the total.

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
        groups = scale_invariant_groups(model, first[1][:2])
    if not groups:
        raise GmixError("the model has no parameters feeding a normalisation layer: no scale-invariant groups")
    trace = ggn_trace(model, data, method, bn_mode=bn_mode, batch_size=batch_size, **kwargs)
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
        extra={"groups": rows, "ggn_trace": trace.value, "weight_norms2": {k: v["norm2"] for k, v in rows.items()}},
    )
