"""Attach named adapter sets to any ``nn.Module`` tree; activate, merge, list and detach them."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cotune.adapters.base import Adapter, AdapterConfig
from cotune.adapters.naming import model_type, original_names
from cotune.adapters.registry import get_family, make_config
from cotune.adapters.site import AdaptedModule, io_widths
from cotune.errors import CotuneError

ConfigLike = AdapterConfig | str


def sites(model: nn.Module) -> dict[str, AdaptedModule]:
    """Every adapted module by its dotted path in the original model."""
    return {m.path: m for m in model.modules() if isinstance(m, AdaptedModule)}


def adapter_sets(model: nn.Module) -> dict[str, list[AdapterConfig]]:
    """The named adapter sets attached to ``model`` and their configs."""
    return getattr(model, "_cotune_sets", {})


def match_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Paths of modules matched by PEFT-style suffixes or a full-match regex; errors when none match."""
    names = [n for n, _ in original_names(model) if n]
    if isinstance(targets, str):
        rx = re.compile(targets)
        hits = [n for n in names if rx.fullmatch(n)]
        wanted = [targets]
    else:
        wanted = list(targets)
        hits = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing and hits:
            raise CotuneError(_no_match_message(missing, names))
    if not hits:
        raise CotuneError(_no_match_message(wanted, names))
    return hits


def _no_match_message(wanted: Sequence[str], names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    near: list[str] = []
    for t in wanted:
        near += difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)
        near += difflib.get_close_matches(t, names, n=3, cutoff=0.6)
    near = list(dict.fromkeys(near))[:6]
    hint = f"; nearest module names: {', '.join(near)}" if near else f"; module names include: {', '.join(leaves[:12])}"
    return f"target_modules {list(wanted)} match no module of the model{hint}"


def default_targets(family: str, model: nn.Module) -> list[str] | str:
    """The family's placement for this architecture, e.g. kron after ``output.dense``."""
    fam = get_family(family)
    mt = model_type(model)
    for key in (mt, "*"):
        if key and key in fam.default_targets:
            return fam.default_targets[key]
    raise CotuneError(
        f"family {family!r} has no default placement for model type {mt or type(model).__name__!r}; "
        f"pass target_modules (known defaults: {sorted(fam.default_targets) or 'none'})"
    )


def head_modules(model: nn.Module) -> list[str]:
    """The task-head module(s) a trainable head sits on: the ``full`` family's default placement for this
    architecture (``classifier`` for BERT, ``score`` for Llama), i.e. PEFT's ``modules_to_save`` of the task.

    The one head mechanism: a single job adds a ``full`` adapter there, the tenant bank gives each tenant its own.
    """
    return match_targets(model, default_targets("full", model))


def _wrap(model: nn.Module, path: str) -> AdaptedModule:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    mod = getattr(parent, leaf)
    if isinstance(mod, AdaptedModule):
        return mod
    site = AdaptedModule(mod, path)
    setattr(parent, leaf, site)
    return site


def attach(
    model: nn.Module,
    config: ConfigLike | Sequence[ConfigLike],
    name: str = "default",
    activate: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Attach adapter set ``name`` built from one config or several (e.g. adapters + a trainable head).

    ``config`` is a family name (``"lowrank"``) with ``overrides`` as its fields, an ``AdapterConfig``,
    or a list of either; ``overrides`` apply to the entries given by name (config objects are used as they
    are, unless no entry is a name). The base model's parameters are frozen; the new adapters are trainable. Returns
    ``model`` (changed in place) so calls chain.
    """
    entries = [config] if isinstance(config, str | AdapterConfig) else list(config)
    # Keyword options belong to the families given by name; a ready-made config object is complete as it is
    # (``["lowrank", make_config("full")], r=8`` must not hand ``r`` to the head). With no name among the
    # entries, they update the config objects instead.
    by_name = any(isinstance(c, str) for c in entries)
    configs = [make_config(c, **overrides) if isinstance(c, str) or not by_name else c for c in entries]
    sets = dict(adapter_sets(model))
    if name in sets:
        raise CotuneError(f"adapter set {name!r} already exists; detach it first or choose another name")
    # Resolve every target and build every adapter before changing anything (the freeze included), so a
    # bad config leaves the model untouched: on a shared base, another tenant keeps training.
    plan = _plan(model, configs, name)
    built: list[tuple[str, Adapter, nn.Module]] = []
    for cfg, path, base in plan:
        d_in, d_out = io_widths(base)
        ad = get_family(cfg.family).adapter_cls(cfg, d_in, d_out, base)
        if isinstance(base, nn.modules.conv._ConvNd) and ad.site != "replace":
            raise CotuneError(
                f"{path} is a {type(base).__name__}: only a module trained in place (the full family) can sit "
                f"there; {cfg.family!r} adapts Linear-like layers"
            )
        ref = next((t for t in base.parameters()), None)
        if ref is not None:
            # PEFT's rule: adapters in fp32 on half-precision bases (autocast_adapter_dtype), else the base's dtype
            dtype = torch.float64 if ref.dtype == torch.float64 else None
            ad.to(device=ref.device if ref.device.type != "meta" else "meta", dtype=dtype)
        ad.train(model.training)  # follow the model's mode: an eval model must not get stochastic adapters
        built.append((path, ad, base))
    for p in model.parameters():
        p.requires_grad_(False)
    for path, ad, base in built:
        site = _wrap(model, path)
        ad.prepare_base(base)
        site.adapters[name] = ad
        for p in ad.parameters():
            p.requires_grad_(True)
    sets[name] = configs
    model._cotune_sets = sets  # type: ignore[assignment]
    if activate:
        set_active(model, name)
    return model


def _plan(model: nn.Module, configs: list[AdapterConfig], name: str) -> list[tuple[AdapterConfig, str, nn.Module]]:
    """``(config, site path, base module)`` of every adapter the set puts on ``model``; resolves each config's
    default targets in ``configs`` (so the saved config is explicit) and refuses two adapters on one module."""
    plan: list[tuple[AdapterConfig, str]] = []
    for i, cfg in enumerate(configs):
        if cfg.target_modules is None:
            configs[i] = cfg = dataclasses.replace(cfg, target_modules=default_targets(cfg.family, model))
        plan += [(cfg, path) for path in match_targets(model, cfg.target_modules)]
    paths = [p for _, p in plan]
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        raise CotuneError(f"adapter set {name!r} puts two adapters on {dup}; make target_modules disjoint")
    out = []
    for cfg, path in plan:
        mod = model.get_submodule(path)
        out.append((cfg, path, mod.base if isinstance(mod, AdaptedModule) else mod))
    return out


@dataclasses.dataclass(frozen=True)
class PlannedAdapter:
    """One adapter that attaching a set would add: its config, site, base module and parameter count."""

    config: AdapterConfig
    path: str
    base: nn.Module
    parameters: int


def plan_adapters(model: nn.Module, configs: Sequence[AdapterConfig]) -> list[PlannedAdapter]:
    """The adapters that attaching ``configs`` would add, each built on the meta device to count its parameters:
    nothing is allocated and the model is not changed (limits can be checked before anything is built)."""
    out = []
    for cfg, path, base in _plan(model, list(configs), "planned"):
        d_in, d_out = io_widths(base)
        with torch.device("meta"):
            ad = get_family(cfg.family).adapter_cls(cfg, d_in, d_out, base)
        out.append(PlannedAdapter(cfg, path, base, sum(p.numel() for p in ad.parameters())))
    return out


def set_active(model: nn.Module, name: str | None) -> None:
    """Make adapter set ``name`` the one every site applies (``None``: the bare base model)."""
    if name is not None and name not in adapter_sets(model):
        raise CotuneError(f"no adapter set {name!r}; attached: {sorted(adapter_sets(model))}")
    for site in sites(model).values():
        site.active = name if name in site.adapters else None
    model._cotune_active = name  # type: ignore[assignment]


def active_set(model: nn.Module) -> str | None:
    return getattr(model, "_cotune_active", None)


def adapters(model: nn.Module, name: str | None = None) -> dict[str, Adapter]:
    """``{site path: adapter}`` of set ``name`` (default: the active set)."""
    name = name or active_set(model)
    return {p: s.adapters[name] for p, s in sites(model).items() if name in s.adapters}  # type: ignore[misc]


def trainable_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """The adapter parameters of set ``name`` by qualified name ``<site path>.<param>``."""
    return {f"{p}.{k}": v for p, ad in adapters(model, name).items() for k, v in ad.named_parameters()}


def parameter_report(model: nn.Module, name: str | None = None) -> tuple[list[tuple[str, int]], int, int]:
    """Per-site trainable counts, their total, and the base model's own parameter count."""
    rows = [(p, ad.num_parameters()) for p, ad in adapters(model, name).items()]
    ids = {id(p) for s in sites(model).values() for a in s.adapters.values() for p in a.parameters()}
    base_total = sum(p.numel() for p in model.parameters() if id(p) not in ids)
    return rows, sum(n for _, n in rows), base_total


def format_parameter_report(rows: list[tuple[str, int]], total: int, base: int, per_module: bool = False) -> str:
    """``parameter_report``'s numbers as a table; modules that differ only by layer index are grouped."""
    lines = []
    if per_module:
        lines += [f"{path:<60} {n:>12,}" for path, n in rows]
    else:
        groups: dict[str, list[int]] = {}
        for path, n in rows:
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", path), []).append(n)
        lines += [f"{k:<60} {len(v):>4} x {v[0]:>10,} = {sum(v):>12,}" for k, v in groups.items()]
    lines.append(f"{'trainable parameters':<60} {total:>25,}")
    lines.append(f"{'base model parameters':<60} {base:>25,}")
    lines.append(f"{'trainable %':<60} {100 * total / max(base, 1):>25.4f}")
    return "\n".join(lines)


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold set ``name`` into the base weights (errors for non-mergeable families before changing anything)."""
    ads = adapters(model, name)
    bad = sorted({ad.config.family for ad in ads.values() if not ad.mergeable})
    if bad:
        raise CotuneError(f"cannot merge: families {bad} are not mergeable (not linear in their input)")
    all_sites = sites(model)
    for path in ads:
        all_sites[path].merge(name or active_set(model))


def unmerge(model: nn.Module) -> None:
    """Restore every merged base weight bit for bit."""
    for site in sites(model).values():
        site.unmerge()


def detach(model: nn.Module, name: str) -> None:
    """Remove adapter set ``name``; sites with no adapters left are unwrapped to the original module."""
    if name not in adapter_sets(model):
        raise CotuneError(f"no adapter set {name!r}; attached: {sorted(adapter_sets(model))}")
    for path, site in list(sites(model).items()):
        if name not in site.adapters:
            continue
        if site.merged == name:
            site.unmerge()
        ad = site.adapters[name]
        ad.restore_base(site.base)  # type: ignore[operator]
        del site.adapters[name]
        if site.active == name:
            site.active = None
        if not site.adapters:
            parent_path, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, site.base)
    sets = dict(adapter_sets(model))
    del sets[name]
    model._cotune_sets = sets  # type: ignore[assignment]
    if active_set(model) == name:
        model._cotune_active = None  # type: ignore[assignment]


@torch.no_grad()
def copy_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str | None = None) -> None:
    """Load ``{<site path>.<param>: tensor}`` into set ``name`` (shape mismatches named per tensor)."""
    params = trainable_parameters(model, name)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad = [
        f"{k}: saved {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
        for k in params
        if k in state and state[k].shape != params[k].shape
    ]
    if missing or unexpected or bad:
        parts = []
        if bad:
            parts.append("shape mismatch (adapter saved for a different base model?): " + "; ".join(bad[:8]))
        if missing:
            parts.append(f"missing tensors: {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected[:8]}")
        raise CotuneError("adapter weights do not fit this model: " + " | ".join(parts))
    for k, p in params.items():
        p.copy_(state[k].to(p.dtype))
