"""Training presets, one module each: ``DESCRIPTION`` (one line) and ``PRESET`` (TrainConfig overrides).

``gmix train --preset NAME`` applies the preset, then the command-line flags override it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

__all__ = ["PRESETS", "get_preset", "preset_names"]


def preset_names() -> list[str]:
    """The names of all presets (the modules of this package).

    >>> "digits" in preset_names()
    True
    """
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_preset(name: str) -> dict[str, Any]:
    """The TrainConfig overrides of preset ``name``; an unknown name raises ValueError listing the valid ones.

    >>> get_preset("digits")["model"]
    'digits_cnn'
    """
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(names)}")
    return dict(importlib.import_module(f"{__name__}.{name}").PRESET)


def __getattr__(attr: str) -> Any:
    if attr == "PRESETS":
        return {n: importlib.import_module(f"{__name__}.{n}").DESCRIPTION for n in preset_names()}
    raise AttributeError(attr)
