"""The Table 1 presets, a registry: every module of this package that defines ``PRESET`` (a
:class:`Table1Preset`) is one, listed by its ``RANK`` (then its name). The next benchmark is a new file here.

``tiny`` (the embedded digits, ``make demo``), ``paper`` (ResNet-18, CIFAR-10, batch 8192, Section 5.1),
``micro`` (seconds, for tests) and ``mnist1d`` (MNIST-1D, where a large batch visibly hurts; issue 16).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType

from gmix_curvature.table1.methods import METHOD
from gmix_curvature.table1.presets._base import Table1Preset

__all__ = ["Table1Preset", "TABLE1_PRESETS", "table1_preset"]


def _discover() -> Mapping[str, Table1Preset]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        preset = getattr(mod, "PRESET", None)
        if not isinstance(preset, Table1Preset):
            raise TypeError(f"{mod.__name__} defines no PRESET (a Table1Preset)")
        if preset.name != info.name:
            raise TypeError(f"{mod.__name__}: the preset's name {preset.name!r} is not its file's")
        found.append((getattr(mod, "RANK", 100), preset.name, preset))
    return MappingProxyType({name: p for _, name, p in sorted(found, key=lambda t: t[:2])})


TABLE1_PRESETS: Mapping[str, Table1Preset] = _discover()


def table1_preset(name: str | Table1Preset) -> Table1Preset:
    """The Table 1 preset ``name`` (a preset passes through); an unknown name raises ValueError listing them.

    >>> table1_preset("tiny").batch_size
    512
    >>> table1_preset("huge")
    Traceback (most recent call last):
    ...
    ValueError: unknown Table 1 preset 'huge'; valid: tiny, paper, micro, mnist1d
    """
    if not isinstance(name, Table1Preset):
        if name not in TABLE1_PRESETS:
            raise ValueError(f"unknown Table 1 preset {name!r}; valid: {', '.join(TABLE1_PRESETS)}")
        name = TABLE1_PRESETS[name]
    unknown = [m for m in name.methods if m not in METHOD]
    if unknown or not name.methods:
        raise ValueError(f"unknown Table 1 methods {unknown or '()'}; valid: {', '.join(METHOD)}")
    return name
