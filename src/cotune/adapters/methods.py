"""Named methods: a method is one family, or a preset of several configs that the papers train together
(e.g. ``loretta_adp`` = TT adapters + trainable LayerNorms + the tensorized classifier).

Open registry like the families: ``@method("name", family="its main family")`` on
``fn(model, **overrides) -> list[AdapterConfig]`` (defined in :mod:`cotune.adapters.base`, below the built-in families that register presets with it, and
importable from here).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cotune.adapters.base import _METHOD_FAMILY, _METHODS, AdapterConfig, MethodFn, method
from cotune.adapters.registry import families, get_family, make_config
from cotune.errors import CotuneError

__all__ = ["MethodFn", "default_lr", "method", "method_configs", "methods"]


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


def default_lr(name: str) -> float:
    """The Adam(W) learning rate of method ``name`` when a config leaves ``optim.lr`` out: its family's
    ``AdapterConfig.default_lr`` (a preset's is its main family's)."""
    if name not in methods():
        raise CotuneError(f"unknown method {name!r}; known: {', '.join(methods())}")
    return get_family(_METHOD_FAMILY.get(name, name)).config_cls.default_lr
