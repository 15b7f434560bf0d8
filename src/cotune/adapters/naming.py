"""How the adapters name a model's parts: its transformers ``model_type`` and its modules in the original naming.

Below :mod:`cotune.adapters.attach` so that the built-in families (which attach imports through the registry)
can place themselves by model type and module name without importing attach.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from cotune.adapters.site import AdaptedModule


def model_type(model: nn.Module) -> str:
    """The transformers ``model_type`` (``bert``, ``llama``, …) or ``""`` for plain modules."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def original_names(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) in the original naming: wrappers stand for their base; adapters are skipped."""
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(mod, AdaptedModule):
            skip.append(name + ".")
            yield name, mod
        else:
            yield name, mod
