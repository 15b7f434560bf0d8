"""Looking adapter families up: every family by name, one by name or ``peft_type``, and a config from options.

Importing this module loads the built-in families (:mod:`cotune.adapters.families`, each registers itself with
``@register`` from :mod:`cotune.adapters.base`); a family a user registers later is found the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import cotune.adapters.families  # noqa: F401 - registers the built-in families and method presets
from cotune.adapters.base import _REGISTRY, AdapterConfig, Family
from cotune.errors import CotuneError


def families() -> list[str]:
    """The registered family names."""
    return sorted(_REGISTRY)


def get_family(name: str) -> Family:
    """Look a family up by name or by its ``peft_type``; unknown names list the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for fam in _REGISTRY.values():
        if fam.config_cls.peft_type == name:
            return fam
    near = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise CotuneError(f"unknown adapter family {name!r}{hint}; known: {', '.join(sorted(_REGISTRY))}")


def make_config(family: str | AdapterConfig, **overrides: Any) -> AdapterConfig:
    """A family's config from its name and ``key=value`` overrides (unknown keys are an error)."""
    if isinstance(family, AdapterConfig):
        if not overrides:
            return family
        d = dataclasses.asdict(family) | overrides
        return type(family).from_dict(d, strict=True)
    return get_family(family).config_cls.from_dict(overrides, strict=True)
