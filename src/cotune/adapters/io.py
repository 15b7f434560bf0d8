"""Save and load adapter sets as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format).

Key layout is PEFT's: ``base_model.model.<module path>.<param>``. A set made only of ``lowrank`` adapters
(plus ``full`` heads, which PEFT calls ``modules_to_save``) is written as a plain PEFT LoRA config, so
Hugging Face PEFT, vLLM and LoRAX load it unchanged; every config also carries ``cotune_components`` so
cotune restores any mix of families exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cotune.adapters.attach import (
    active_set,
    adapter_sets,
    attach,
    copy_adapter_weights,
    detach,
    sites,
    trainable_parameters,
)
from cotune.adapters.base import AdapterConfig
from cotune.adapters.naming import original_names
from cotune.adapters.registry import get_family
from cotune.errors import CotuneError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: transformers auto class -> PEFT task_type
TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForTokenClassification": "TOKEN_CLS",
}


#: PEFT task types whose model class adds these modules to ``modules_to_save`` and then expects their weights.
HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS"}
PEFT_HEAD_NAMES = ("classifier", "score")


def _task_type(model: nn.Module, saved: set[str] | None = None) -> str | None:
    """PEFT's task_type for ``model``, or None where PEFT could not load the saved weights under it.

    PEFT's ``PeftModelForSequenceClassification`` (and token classification) always wraps the model's
    ``classifier`` / ``score`` module as ``modules_to_save`` and raises ``KeyError`` on load when the adapter
    holds no weights for it. An adapter that leaves the head untrained is therefore written with
    ``task_type: null``, which PEFT loads as a plain ``PeftModel`` on the same base.
    """
    name = type(model).__name__
    task = next((v for k, v in TASK_TYPES.items() if name.endswith(k)), None)
    if task in HEAD_TASKS and saved is not None:
        for path, mod in original_names(model):
            if path.rsplit(".", 1)[-1] not in PEFT_HEAD_NAMES:
                continue
            wanted = {f"{path}.{k}" for k, _ in getattr(mod, "base", mod).named_parameters()}
            if not wanted <= saved:
                return None
    return task


def _base_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def adapter_config_dict(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The JSON written to ``adapter_config.json`` for set ``name``."""
    name = name or active_set(model)
    if name not in adapter_sets(model):
        raise CotuneError(f"no adapter set {name!r} to save; attached: {sorted(adapter_sets(model))}")
    configs = adapter_sets(model)[name]
    main = [c for c in configs if c.family != "full"]
    heads = [c for c in configs if c.family == "full"]
    first = (main or heads)[0]
    out: dict[str, Any] = dict(first.to_dict())
    out.pop("site", None)
    out.pop("cotune_family", None)
    mts: list[str] = []
    for c in heads:
        t = c.target_modules
        mts += [t] if isinstance(t, str) else list(t or [])
    fan_in_fan_out = any(type(s.base).__name__ == "Conv1D" for s in sites(model).values())
    out.update(
        base_model_name_or_path=_base_name(model),
        task_type=_task_type(model, set(trainable_parameters(model, name))),
        modules_to_save=mts or None,
        inference_mode=True,
    )
    pooling = getattr(getattr(model, "config", None), "cotune_pooling", None)
    if pooling is not None:  # PEFT ignores it (with a warning) and its head reads the model's pooler
        out["cotune_pooling"] = pooling
    if first.family == "lowrank" and len(main) == 1:
        # A plain PEFT LoRA: PEFT's own fields say everything, so no cotune-only keys (PEFT warns on those).
        out.update(bias="none", fan_in_fan_out=fan_in_fan_out, init_lora_weights=True)
    else:
        out["cotune_components"] = [c.to_dict() for c in configs]
    return out


def save_adapter(model: nn.Module, folder: str | os.PathLike, name: str | None = None,
                 base_model: str | None = None) -> Path:
    """Write set ``name`` (default: the active one) to ``folder``; returns the folder. ``base_model``: the name
    written as ``base_model_name_or_path`` (default: where the model was loaded from)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config_dict(model, name)
    if base_model is not None:
        cfg["base_model_name_or_path"] = base_model
    state = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in trainable_parameters(model, name).items()}
    # Write to temporary names then rename, so a crash never leaves a half-written adapter behind.
    tmp_w, tmp_c = folder / (WEIGHTS_NAME + ".tmp"), folder / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    os.replace(tmp_w, folder / WEIGHTS_NAME)
    os.replace(tmp_c, folder / CONFIG_NAME)
    return folder


def read_adapter_config(folder: str | os.PathLike) -> list[AdapterConfig]:
    """The configs of a saved set: cotune's components, or a PEFT LoRA config translated."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CotuneError(f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CotuneError(f"{path} is not valid JSON ({e}); the adapter folder is corrupt") from e
    if "cotune_components" in raw:
        return [get_family(c["cotune_family"]).config_cls.from_dict(c) for c in raw["cotune_components"]]
    return _from_peft(raw, path)


def _from_peft(raw: dict[str, Any], path: Path) -> list[AdapterConfig]:
    if raw.get("peft_type") != "LORA":
        fam = get_family(str(raw.get("peft_type", "?")))  # errors with the known families
        return [fam.config_cls.from_dict(raw)]
    for flag in ("use_dora", "use_qalora", "lora_bias"):
        if raw.get(flag):
            raise CotuneError(f"{path}: PEFT option {flag}=true is not supported by cotune's lowrank family")
    if raw.get("rank_pattern") or raw.get("alpha_pattern") or raw.get("layers_to_transform"):
        raise CotuneError(f"{path}: per-layer rank/alpha patterns and layers_to_transform are not supported")
    lowrank = get_family("lowrank").config_cls.from_dict(raw)
    configs: list[AdapterConfig] = [lowrank]
    if raw.get("modules_to_save"):
        configs.append(get_family("full").config_cls(target_modules=list(raw["modules_to_save"])))
    return configs


def present_heads(model: nn.Module, configs: list[AdapterConfig]) -> list[AdapterConfig]:
    """``configs`` without the ``full`` head targets that ``model`` does not have (read configs before attaching).

    PEFT writes ``modules_to_save=["classifier", "score"]`` whatever the model has: a ``full`` config keeps the
    targets that match a module of ``model`` (as a suffix) and is dropped when none is left; other configs pass
    unchanged. The kept configs are changed in place.
    """
    names = [n for n, _ in original_names(model)]
    out = []
    for c in configs:
        if c.family == "full" and isinstance(c.target_modules, list):
            kept = [t for t in c.target_modules if any(n == t or n.endswith("." + t) for n in names)]
            if not kept:
                continue
            c.target_modules = kept
        out.append(c)
    return out


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter keyed ``<module path>.<param>`` (PEFT prefix removed)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        bin_path = Path(folder) / "adapter_model.bin"
        extra = f" (found {bin_path.name}: re-save it with safetensors)" if bin_path.is_file() else ""
        raise CotuneError(f"{path} not found{extra}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CotuneError(f"{path} is not a readable safetensors file ({e}); the adapter is corrupt") from e
    return {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): v for k, v in state.items()}


def _check_pooling(model: nn.Module, folder: str | os.PathLike) -> None:
    """A head trained on one sentence embedding must not read another (``cotune.tasks.pooling``)."""
    if _task_type(model) != "SEQ_CLS":
        return
    saved = json.loads((Path(folder) / CONFIG_NAME).read_text()).get("cotune_pooling")
    here = getattr(model.config, "cotune_pooling", None)
    if saved != here:
        def say(mode: str | None) -> str:
            return f"pooling {mode!r}" if mode else "the model's own pooler"

        raise CotuneError(f"{folder}: this adapter was trained on {say(saved)} but the model's head reads {say(here)}; "
                          f"build the model with pooling={saved or 'model'!r} (task option `pooling`)")


def load_adapter(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", activate: bool = True
) -> nn.Module:
    """Attach the set saved in ``folder`` (cotune or PEFT LoRA) as ``name`` and load its weights.

    On any error the model is left as it was.
    """
    configs = present_heads(model, read_adapter_config(folder))
    _check_pooling(model, folder)
    state = load_weights(folder)
    attach(model, configs, name=name, activate=activate)
    try:
        copy_adapter_weights(model, state, name)
    except CotuneError as e:
        detach(model, name)
        raise CotuneError(f"{Path(folder)}: {e}") from e
    return model
