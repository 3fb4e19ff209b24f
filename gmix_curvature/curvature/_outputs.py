"""What a model returns, turned into the tensor of predictions the estimators differentiate.

A model may return a tensor (a plain classifier), a tuple or list (the tensor first, as many
research codebases do), a mapping with a ``"logits"`` entry, or an object with a ``.logits``
attribute (Hugging Face's ``ModelOutput``). :func:`model_output` picks the tensor out; a caller with
another layout passes its own ``output_fn`` to the estimators. :func:`call_model` calls the model on
a batch-first tensor or on a mapping of them (``model(**x)``, as Hugging Face models take
``input_ids``, ``attention_mask``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gmix_curvature.errors import GmixError

__all__ = ["OutputFn", "call_model", "model_output", "predictions", "resolve_output_fn"]

OutputFn = Callable[[Any], torch.Tensor]


def model_output(output: Any) -> torch.Tensor:
    """The prediction tensor in what a model returned.

    A tensor as is; a tuple or list: its first element; a mapping: its ``"logits"`` entry; an
    object with a ``.logits`` attribute: that attribute. Anything else raises a one-line
    :class:`GmixError`.

    >>> import torch
    >>> model_output({"logits": torch.zeros(2, 3), "loss": None}).shape
    torch.Size([2, 3])
    >>> model_output((torch.ones(1, 4), "hidden")).shape
    torch.Size([1, 4])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], torch.Tensor):
            return output["logits"]
        keys = ", ".join(repr(k) for k in list(output)[:8])
        raise GmixError(f"the model returned a mapping without a 'logits' tensor (keys {keys}); pass output_fn=")
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list):
        if output and isinstance(output[0], torch.Tensor):
            return output[0]
        raise GmixError("the model returned a tuple whose first element is not a tensor; pass output_fn=")
    raise GmixError(f"cannot find the logits in a model output of type {type(output).__name__}; pass output_fn=")


def call_model(model: nn.Module | Callable[..., Any], x: Any) -> Any:
    """``model(**x)`` for a mapping of batch-first tensors, else ``model(x)``."""
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


def resolve_output_fn(output_fn: OutputFn | None) -> OutputFn:
    """``output_fn`` (checked to return a tensor) or the default :func:`model_output`; a non-callable raises
    :class:`GmixError`."""
    if output_fn is None or output_fn is model_output or getattr(output_fn, "_gmix_checked", False):
        return model_output if output_fn is None else output_fn
    if not callable(output_fn):
        raise GmixError(f"output_fn must be callable, got {type(output_fn).__name__}")

    def checked(output: Any) -> torch.Tensor:
        out = output_fn(output)
        if not isinstance(out, torch.Tensor):
            raise GmixError(f"output_fn must return a tensor, got {type(out).__name__}")
        return out

    checked._gmix_checked = True  # type: ignore[attr-defined]
    return checked


def predictions(model: nn.Module | Callable[..., Any], x: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The model's prediction tensor on a batch: ``output_fn(call_model(model, x))``, checked to be a tensor."""
    out = resolve_output_fn(output_fn)(call_model(model, x))
    if not isinstance(out, torch.Tensor):
        raise GmixError(f"output_fn must return a tensor, got {type(out).__name__}")
    return out
