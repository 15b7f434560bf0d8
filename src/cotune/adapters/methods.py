"""Named methods: a method is one family, or a preset of several configs that the papers train together
(e.g. ``loretta_adp`` = TT adapters + trainable LayerNorms + the tensorized classifier).

Open registry like the families: ``@method("name")`` on ``fn(model, **overrides) -> list[AdapterConfig]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from cotune.adapters.base import AdapterConfig, families, make_config
from cotune.errors import CotuneError

MethodFn = Callable[..., list[AdapterConfig]]
_METHODS: dict[str, MethodFn] = {}


def method(name: str) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        _METHODS[name] = fn
        return fn

    return deco


def methods() -> list[str]:
    """Every name ``method_configs`` accepts: presets and plain families."""
    return sorted(set(_METHODS) | set(families()))


def method_configs(name: str, model: nn.Module | None = None, **overrides: Any) -> list[AdapterConfig]:
    """The configs that make up method ``name`` (a preset, or a single family with ``overrides``)."""
    families()  # registers built-in families and presets
    if name in _METHODS:
        return _METHODS[name](model, **overrides)
    if name in families():
        return [make_config(name, **overrides)]
    raise CotuneError(f"unknown method {name!r}; known: {', '.join(methods())}")
