"""``key=value`` overrides (YAML-typed values, dotted keys for nesting) and typed dataclass configs, shared by every
command and by the adapter families' configs."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
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


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``d``: unknown keys and values of the wrong type are errors naming the
    key (``where`` prefixes it, e.g. ``optim.lr``)."""
    types_ = field_types(cls)
    unknown = sorted(k for k in d if k not in types_)
    if unknown:
        place = f" in {where!r}" if where else ""
        near = [m for k in unknown for m in difflib.get_close_matches(k, list(types_), n=1)]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise CotuneError(f"unknown config key(s) {unknown}{place}{hint}; valid keys: {', '.join(types_)}")
    kwargs = {k: check_value(f"{where}.{k}" if where else k, types_[k], v) for k, v in d.items()}
    return cls(**kwargs)


def check_value(where: str, tp: Any, value: Any) -> Any:
    """Coerce ``value`` to annotation ``tp`` where YAML is looser (ints for floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(where, a, value)
            except CotuneError:
                continue
        raise CotuneError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CotuneError(f"{where}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise CotuneError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise CotuneError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [check_value(where, item, v) for v in value]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise CotuneError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(where, args[0], v) for v in value)
        if len(args) != len(value):
            raise CotuneError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(check_value(where, a, v) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):  # flags as the seeds' scripts pass them (--sharing_up 1)
            return bool(value)
        raise CotuneError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise CotuneError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise CotuneError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise CotuneError(f"{where}: expected a string, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
