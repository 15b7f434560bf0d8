"""``key=value`` overrides (YAML-typed values, dotted keys for nesting) shared by every command."""

from __future__ import annotations

from typing import Any

import yaml

from cotune.errors import CotuneError


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["r=8", "adapter.target_modules=[query,value]"]`` -> ``{"r": 8, "adapter": {...}}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CotuneError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise CotuneError(f"override {item!r}: value is not valid YAML ({e})") from e
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CotuneError(f"override {item!r} conflicts with an earlier scalar {part!r}")
        node[leaf] = value
    return out


def deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``upd`` merged in recursively (returns a new dict)."""
    out = dict(base)
    for k, v in upd.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
