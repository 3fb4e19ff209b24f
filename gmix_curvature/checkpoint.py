"""Checkpoints: written atomically, read back as (model, config) from gmix runs or any PyTorch training.

A checkpoint written by ``gmix train`` is a ``torch.save`` of a dict with ``"format": "gmix-checkpoint"``
holding ``model`` (state_dict), ``config`` (the resolved training configuration as a plain dict,
including ``model``, ``model_kwargs``, ``num_classes`` and ``input_shape``), ``optimizer``,
``scheduler``, ``step`` and ``rng`` (every generator's state). Everything in it is a tensor or plain
Python data, so it loads with ``torch.load(weights_only=True)``.

:func:`load_checkpoint` also reads a plain ``state_dict`` (or a dict with one under ``state_dict`` or
``model``) given the architecture's name, and a whole pickled ``nn.Module`` (a pickle runs code:
load only files you trust).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gmix_curvature.errors import CheckpointError
from gmix_curvature.models import build_model

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "model_from_config", "FORMAT"]

FORMAT = "gmix-checkpoint"


def save_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` with ``torch.save`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over ``path``; a crash leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` with one-line errors: a missing file, or a file that is not a torch checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        candidate = path / "checkpoint.pt"
        if not candidate.exists():
            raise FileNotFoundError(f"{path} is a directory without checkpoint.pt")
        path = candidate
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        first_error = exc
    except (EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({exc.__class__.__name__})") from None
    # A pickled module cannot be read with weights_only=True; it is a pickle and runs code.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({' '.join(str(first_error).split())[:120]})"
        ) from None
    if not isinstance(obj, nn.Module):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict, module or gmix checkpoint")
    return obj


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Build the (untrained) model a gmix configuration names."""
    return build_model(
        config["model"],
        num_classes=int(config["num_classes"]),
        input_shape=tuple(config["input_shape"]),
        **dict(config.get("model_kwargs") or {}),
    )


def _load_state(model: nn.Module, state: Mapping[str, Any], arch: str, path: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{path} does not fit the architecture {arch}: {detail[:300]}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
        raise CheckpointError(f"{path} does not fit the architecture {arch}: {', '.join(parts)}")


def _infer_num_classes(state: Mapping[str, Any]) -> int:
    mats = [v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim == 2]
    if not mats:
        raise CheckpointError("cannot infer the number of classes: no 2-d weight in the state_dict")
    return int(mats[-1].shape[0])


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint as ``(model, config)``, the model in eval mode.

    For a checkpoint of ``gmix train`` nothing else is needed (``path`` may be the run directory).
    For a plain state_dict, ``model`` names the architecture (a gmix model or ``torchvision:NAME``);
    ``num_classes`` defaults to the rows of the last 2-d weight. A pickled module needs nothing.
    The returned config then holds what was given.

    >>> import tempfile, os
    >>> from gmix_curvature.models import MLP
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "w.pt")
    >>> torch.save(MLP(64, 10, hidden=(8,)).state_dict(), p)
    >>> net, cfg = load_checkpoint(p, model="mlp", input_shape=(1, 8, 8), model_kwargs={"hidden": [8]})
    >>> cfg["num_classes"], net.training
    (10, False)
    """
    path = Path(path)
    obj = read_checkpoint(path)
    if isinstance(obj, nn.Module):
        net = obj
        config: dict[str, Any] = {"model": model or type(obj).__name__, "source": "module"}
    elif isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        config = dict(obj["config"])
        if model is not None and model != config["model"]:
            raise CheckpointError(f"{path} holds a {config['model']} model, not {model}")
        net = model_from_config(config)
        _load_state(net, obj["model"], config["model"], path)
    elif isinstance(obj, Mapping):
        state = obj
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} is not a state_dict: its values are not all tensors")
        if model is None:
            raise CheckpointError(f"{path} is a plain state_dict: name its architecture with --model")
        config = {
            "model": model,
            "num_classes": int(num_classes) if num_classes is not None else _infer_num_classes(state),
            "input_shape": list(input_shape) if input_shape is not None else [3, 32, 32],
            "model_kwargs": dict(model_kwargs or {}),
            "source": "state_dict",
        }
        net = model_from_config(config)
        _load_state(net, state, model, path)
    else:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint")
    net.eval()
    return net, config
