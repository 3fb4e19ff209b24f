"""Checkpoints: written atomically, read back as (model, config) from gmix runs or any PyTorch training.

A checkpoint written by ``gmix train`` is a ``torch.save`` of a dict with ``"format": "gmix-checkpoint"``
holding ``model`` (state_dict), ``config`` (the resolved training configuration as a plain dict,
including ``model``, ``model_kwargs``, ``num_classes`` and ``input_shape``), ``optimizer``,
``scheduler``, ``step``, ``running`` (the training statistics since the last evaluation) and ``rng``
(every generator's state). Everything in it is a tensor or plain Python data, so it loads with
``torch.load(weights_only=True)``.

:func:`load_checkpoint` also reads a plain ``state_dict`` (or a dict with one under ``state_dict`` or
``model``) given the architecture's name, from a ``torch.save`` file or a ``.safetensors`` file.

Security: loading never runs code unless asked to. Files are read with ``torch.load(weights_only=True)``,
which rebuilds only tensors and plain Python data, or with ``safetensors``, which holds tensors alone. A
file that needs full unpickling (a whole pickled ``nn.Module``, custom classes) is refused with one line
naming the opt-in: ``trust=True`` here, ``--trust-checkpoint`` on the command line. Trusting a file means
running it: unpickling imports and calls whatever the file names, with your permissions, before any check
can look at the result; trust only files you made yourself or got from a source you would run code from.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import tempfile
import warnings
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


TRUST_HINT = "--trust-checkpoint (trust=True)"


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's header: an 8-byte little-endian length, then ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({' '.join(str(exc).split())[:120]})") from None


def _pickle_globals(path: Path) -> list[str]:
    """The classes and functions the first pickle in ``path`` names, read with ``pickletools`` (which parses the
    opcodes and runs nothing); those torch's ``weights_only`` loader allows come last. Empty for a non-pickle."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle, or a truncated one: whatever was named before the damage
        pass
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=lambda n: n.split(".")[0] in ("torch", "collections"))


def _refusal(path: Path, exc: BaseException) -> CheckpointError:
    """The one-line refusal of a file that ``weights_only`` cannot read: one naming a class or function
    (it needs full unpickling, i.e. running code), or one that is no torch checkpoint at all."""
    text = " ".join(str(exc).split())
    named = re.search(r"GLOBAL ([\w.]+)", text)
    names = [named.group(1)] if named else _pickle_globals(path)[:1]
    if names:
        return CheckpointError(
            f"{path} needs full unpickling, which runs code (it names {names[0]}); "
            f"load it only if you trust its source, with {TRUST_HINT}"
        )
    opcode = re.search(r"Unsupported operand (\d+)", text)
    detail = f"pickle opcode {opcode.group(1)} is not allowed" if opcode else text[:120]
    return CheckpointError(f"{path} is not a PyTorch checkpoint ({detail})")


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Any:
    """Read a checkpoint file (or a run directory's ``checkpoint.pt``) without running code.

    ``torch.load(weights_only=True)`` for ``torch.save`` files, ``safetensors`` for ``.safetensors`` files.
    A file that needs full unpickling raises :class:`CheckpointError` naming the opt-in; with ``trust=True`` it
    is unpickled in full (which runs whatever code it names: see the module docstring). Other one-line errors:
    a missing file, or a file that is not a checkpoint.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "net.pt")
    >>> torch.save(nn.Linear(2, 1), p)  # a whole pickled module
    >>> try:
    ...     read_checkpoint(p)
    ... except CheckpointError as exc:
    ...     print(str(exc).split("; ")[0].split(" needs")[1])
     full unpickling, which runs code (it names torch.nn.modules.linear.Linear)
    >>> type(read_checkpoint(p, trust=True)).__name__
    'Linear'
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        for name in ("checkpoint.pt", "model.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} is a directory without checkpoint.pt")
    try:
        is_safetensors = _is_safetensors(path)
    except OSError as exc:  # e.g. permission denied
        raise CheckpointError(f"{path} cannot be read: [Errno {exc.errno}] {exc.strerror}") from None
    if is_safetensors:
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refusal(path, exc)
    except (RuntimeError, AttributeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({exc.__class__.__name__})") from None
    if not trust:
        raise refused
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(obj, nn.Module | Mapping):
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
    trust: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint as ``(model, config)``, the model in eval mode.

    For a checkpoint of ``gmix train`` nothing else is needed (``path`` may be the run directory).
    For a plain state_dict, ``model`` names the architecture (a gmix model or ``torchvision:NAME``);
    ``num_classes`` defaults to the rows of the last 2-d weight. The returned config then holds what was given.
    A ``.safetensors`` file is read as a state_dict. A whole pickled module needs ``trust=True`` (it is unpickled
    in full, which runs code; see :func:`read_checkpoint`) and nothing else.

    >>> import tempfile, os
    >>> from gmix_curvature.models import MLP
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "w.pt")
    >>> torch.save(MLP(64, 10, hidden=(8,)).state_dict(), p)
    >>> net, cfg = load_checkpoint(p, model="mlp", input_shape=(1, 8, 8), model_kwargs={"hidden": [8]})
    >>> cfg["num_classes"], net.training
    (10, False)
    """
    path = Path(path)
    obj = read_checkpoint(path, trust=trust)
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
