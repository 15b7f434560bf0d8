"""Named methods: a method is one family, or a preset of several configs that the papers train together
(e.g. ``loretta_adp`` = TT adapters + trainable LayerNorms + the tensorized classifier).

Open registry like the families: ``@method("name")`` on ``fn(model, **overrides) -> list[AdapterConfig]``
(defined in :mod:`cotune.adapters.base`, below the built-in families that register presets with it, and
importable from here).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cotune.adapters.base import _METHODS, AdapterConfig, MethodFn, method
from cotune.adapters.registry import families, make_config
from cotune.errors import CotuneError

__all__ = ["MethodFn", "method", "method_configs", "methods"]


def methods() -> list[str]:
    """Every name ``method_configs`` accepts: presets and plain families."""
    return sorted(set(_METHODS) | set(families()))


def method_configs(name: str, model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """The configs that make up method ``name`` (a preset, or a single family with ``overrides``)."""
    if name in _METHODS:
        return _METHODS[name](model, **overrides)
    if name in families():
        return [make_config(name, **overrides)]
    raise CotuneError(f"unknown method {name!r}; known: {', '.join(methods())}")
