"""Rebuilding a trained model from a saved adapter: the run's config, its task and its base model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from cotune.adapters import load_adapter
from cotune.config import deep_update, parse_overrides
from cotune.errors import CotuneError
from cotune.training.config import TrainConfig, config_from_dict, read_yaml

#: PEFT task_type -> cotune task kind (for adapters saved without a run config).
PEFT_TASKS = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm", "SEQ_2_SEQ_LM": "seq2seq"}


def run_config_path(adapter_dir: str | os.PathLike) -> Path | None:
    """``config.yaml`` of the run an adapter folder belongs to (``run/adapter`` or ``run/checkpoint-N/adapter``)."""
    a = Path(adapter_dir).resolve()
    for cand in (a / "config.yaml", a.parent / "config.yaml", a.parent.parent / "config.yaml"):
        if cand.is_file():
            return cand
    return None


def adapter_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(adapter_dir) / "adapter_config.json"
    if not p.is_file():
        raise CotuneError(f"{p} not found: --adapter must be a folder with adapter_config.json (e.g. RUN/adapter)")
    return json.loads(p.read_text())


def eval_config(
    adapter_dir: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    **fields: Any,
) -> TrainConfig:
    """The config that rebuilds an adapter's model and task.

    Starts from ``config``, else the run's own ``config.yaml``, else what ``adapter_config.json`` records
    (base model, PEFT task type); then ``fields`` (``model=``, ``task={"kind": .., "data": ..}``; ``None``
    values are ignored) and ``key=value`` overrides are applied.
    """
    path = config or run_config_path(adapter_dir)
    if path is not None:
        d = read_yaml(path)
    else:
        meta = adapter_meta(adapter_dir)
        d = {"task": {"kind": PEFT_TASKS.get(str(meta.get("task_type")), "seq_cls")}}
        if meta.get("base_model_name_or_path"):
            d["model"] = meta["base_model_name_or_path"]
    d = deep_update(d, _drop_none(fields))
    d = deep_update(d, parse_overrides(list(overrides or [])))
    d.update(overwrite=False, resume=False)  # evaluation never writes the run folder
    return config_from_dict(d)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if not v:
                continue
        if v is not None:
            out[k] = v
    return out


def load_trained(cfg: TrainConfig, adapter_dir: str | os.PathLike) -> tuple[Any, nn.Module]:
    """(task, model with the saved adapter attached and active), built exactly as training built it."""
    from cotune.tasks import make_task
    from cotune.training.trainer import check_model_available, seed_everything

    check_model_available(cfg.model, cfg.task.kind)
    seed_everything(cfg.seed)  # an untrained head (train_head=false) gets the same init as in training
    task = make_task(cfg.task.kind, cfg.task.data, model=cfg.model, **cfg.task_options())
    model = task.build_model(cfg.model)
    model.to(cfg.device_name())
    load_adapter(model, adapter_dir)
    return task, model


def head_labels(adapter_dir: str | os.PathLike) -> int | None:
    """Number of labels of a saved classification head (its last projection's rows), if it has one."""
    from cotune.adapters.io import load_weights

    for k, v in load_weights(adapter_dir).items():
        if re.search(r"(^|\.)(classifier|score)(\.out_proj)?\.weight$", k) and v.dim() == 2:
            return int(v.shape[0])
    return None
