"""The training configuration: dataclasses loaded from YAML, ``key=value`` overrides, strict key checking.

A config file mirrors ``TrainConfig`` (see ``examples/*.yaml``)::

    model: minilm
    task: {kind: seq_cls, data: ../shared/data/glue/SST-2, options: {max_length: 64}}
    method: {name: lowrank, options: {r: 8, lora_alpha: 8}}
    engine: {name: gl, options: {interval: 1}}
    optim: {optimizer: adamw, lr: 1.0e-3}   # without lr: the method's default_lr (Adam/AdamW, not zo)
    batch_size: 32
    max_steps: 500
    output_dir: runs/sst2-cola

``task.data`` is a path (relative to the config file's folder, else to the working directory), a known short name (``glue/SST-2``, ``sst2``,
``gsm8k``, …) looked up under ``data_root`` then the task's default roots (``$COTUNE_DATA``, ``./data``,
``../shared/data``), or a hub name when online (see ``cotune.tasks.catalog``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cotune.adapters.methods import default_lr, method_configs, methods
from cotune.adapters.registry import families, get_family
from cotune.config import deep_update, from_dict, parse_overrides
from cotune.engines.base import OptimConfig
from cotune.errors import CotuneError


@dataclass
class TaskConfig:
    """What to learn: the task kind, where its data lives, and the task's own options (max_length, …)."""

    kind: str = "seq_cls"  # seq_cls | causal_lm | multiple_choice | image_cls | seq2seq
    data: str = ""  # a local folder/file in the task's published format, or a hub name when online
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """Which adapters: a family or preset name (``cotune params`` lists them) and its options.

    ``train_head``: for sequence classification a new head must be trained; ``auto`` adds a ``full``
    config on it unless the method already covers it (PEFT's ``modules_to_save``).
    """

    name: str = "lowrank"
    options: dict[str, Any] = field(default_factory=dict)
    train_head: bool | str = "auto"  # auto | true | false


@dataclass
class EngineConfig:
    """How the adapters learn: backprop | gl (ColA gradient learning) | zo (MeZO), plus engine options."""

    name: str = "backprop"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Everything one training run needs; saved resolved as ``output_dir/config.yaml``."""

    model: str = "minilm"
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    batch_size: int = 16
    eval_batch_size: int = 64
    #: Training length: ``max_steps`` micro-batches if set, else ``epochs`` passes over the train split.
    max_steps: int | None = None
    epochs: float = 1.0
    #: Use only this many train rows (a seeded random subset), for quick runs.
    train_limit: int | None = None
    #: Evaluate on the validation split every N steps (0: only at the end) on at most ``eval_limit`` rows.
    eval_every: int = 0
    eval_limit: int | None = None
    val_split: str = "validation"
    #: Hold out this many train rows (int) or this fraction (float < 1) as the validation split instead.
    val_size: float | None = None
    #: Evaluate the best checkpoint on ``test_split`` at the end (never used for selection).
    test: bool = False
    test_split: str = "test"
    test_limit: int | None = None
    log_every: int = 10
    #: Write ``checkpoint-N/`` every N steps (0: only at the end) and keep the last ``keep_checkpoints``.
    save_every: int = 0
    keep_checkpoints: int = 2
    output_dir: str = "runs/train"
    overwrite: bool = False
    resume: bool = False
    data_root: str | None = None
    device: str = "cpu"  # cpu | cuda | auto
    progress: bool = True
    #: Also send the logged metrics to ``tensorboard`` and/or ``wandb`` (optional extras; see training.reporting).
    report_to: list[str] | str | None = None
    #: ColA collaboration: one adapter family per user, all trained on one base in one run (training.collaboration).
    users: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def task_options(self) -> dict[str, Any]:
        """``task.options`` plus ``data_root`` (where the task looks up short/relative data names first)."""
        opts = dict(self.task.options)
        if self.data_root and "data_root" not in opts:
            opts["data_root"] = self.data_root
        return opts

    def device_name(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A validated ``TrainConfig``; unknown keys at any level are an error listing the valid ones.

    ``optim.lr`` left out: the method's tuned rate (``optim_lr``), written into the saved config.
    """
    _hint_method_options(d)
    cfg: TrainConfig = from_dict(TrainConfig, d)
    if "lr" not in (d.get("optim") or {}):  # replace() re-runs OptimConfig's range checks
        cfg.optim = dataclasses.replace(cfg.optim, lr=optim_lr(cfg.method.name, cfg.engine.name, cfg.optim.optimizer))
    validate(cfg)
    return cfg


def optim_lr(method: str, engine: str, optimizer: str) -> float:
    """The learning rate of a run that names none: the method's ``default_lr`` for an Adam(W) run with
    gradients (backprop, gl), ``OptimConfig``'s otherwise (zeroth order and plain SGD take rates of
    another scale, which no family default describes)."""
    if engine != "zo" and optimizer in ("adam", "adamw") and method in methods():
        return default_lr(method)
    return OptimConfig.lr


def _hint_method_options(d: dict[str, Any]) -> None:
    """A top-level key that is an option of the method's family (AdaKron's ``inference_level``) names its place."""
    name = (d.get("method") or {}).get("name", MethodConfig.name) if isinstance(d.get("method"), dict | None) else None
    if name not in families():
        return
    options = {f.name for f in dataclasses.fields(get_family(name).config_cls)}
    stray = sorted(k for k in d if k not in {f.name for f in dataclasses.fields(TrainConfig)} and k in options)
    if stray:
        where = ", ".join(f"method.options.{k}" for k in stray)
        raise CotuneError(f"{stray} are options of the {name!r} adapter family, not top-level keys: set {where}")


def validate(cfg: TrainConfig) -> None:
    """Range checks that the type check cannot express."""
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise CotuneError("batch_size and eval_batch_size must be >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise CotuneError(f"max_steps must be >= 1 (got {cfg.max_steps}); leave it out to train for `epochs`")
    if cfg.max_steps is None and not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        raise CotuneError(f"epochs must be > 0 (got {cfg.epochs})")
    for name in ("eval_every", "save_every", "log_every"):
        if getattr(cfg, name) < 0:
            raise CotuneError(f"{name} must be >= 0")
    if cfg.keep_checkpoints < 1:
        raise CotuneError("keep_checkpoints must be >= 1 (the last checkpoint is what --resume continues from)")
    if cfg.device not in ("cpu", "cuda", "auto") and not cfg.device.startswith("cuda:"):
        raise CotuneError(f"device must be cpu, cuda, cuda:N or auto (got {cfg.device!r})")
    if str(cfg.method.train_head).lower() not in ("auto", "true", "false"):
        raise CotuneError(f"method.train_head must be auto, true or false (got {cfg.method.train_head!r})")
    if cfg.val_size is not None and cfg.val_size <= 0:
        raise CotuneError("val_size must be > 0 (a fraction < 1 or a number of rows)")
    if not cfg.task.data:
        raise CotuneError("task.data is empty: point it at the data set (a local folder/file, or a hub name)")
    from cotune.training.reporting import report_names

    report_names(cfg.report_to)  # unknown names fail here, before the model loads
    for family in cfg.users or []:
        if family not in methods():
            raise CotuneError(f"users: unknown adapter family {family!r}; known: {', '.join(methods())}")
    # The method's options, type-checked now (r="8" is one error line), not after the model has loaded.
    options = dict(cfg.method.options)
    if options.get("target_modules") == "all":  # expanded against the model later
        options.pop("target_modules")
    try:
        method_configs(cfg.method.name, None, **options)
    except CotuneError as e:
        raise CotuneError(f"method {cfg.method.name!r}: {e}") from e
    except Exception:  # a user's preset that needs the model is checked when the model is built
        pass


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML config file, with clear errors for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise CotuneError(f"config file {p} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise CotuneError(f"config file {p} is not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CotuneError(f"config file {p} must hold a mapping of keys (got {type(raw).__name__})")
    return raw


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """``base`` (e.g. from a ColA run name), then the YAML file, then ``key=value`` overrides, validated."""
    d: dict[str, Any] = dict(base or {})
    if path is not None:
        d = deep_update(d, relative_to_file(read_yaml(path), Path(path).parent))
    if overrides:
        d = deep_update(d, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return config_from_dict(d)


def _near_file(value: Any, folder: Path) -> Any:
    """``value`` made absolute against ``folder`` when it is a relative path that exists there."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    here = folder / value
    return str(here.resolve()) if here.exists() else value


def relative_to_file(d: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config file's mapping with its local paths (``task.data``, ``data_root``, ``model``) read from ``folder``.

    A path written in a config file means a place next to that file, wherever ``cotune train`` runs from, so an
    example copied elsewhere keeps its meaning. A value that does not exist beside the file (a short data name such
    as ``glue/SST-2``, a registry model such as ``minilm``, a hub name) is left as it is and resolved as before:
    the working directory, then ``data_root`` and the data roots (``cotune.tasks.catalog``).
    """
    out = dict(d)
    for key in ("data_root", "model"):
        if key in out:
            out[key] = _near_file(out[key], folder)
    if isinstance(out.get("task"), dict) and "data" in out["task"]:
        out["task"] = {**out["task"], "data": _near_file(out["task"]["data"], folder)}
    return out


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (what ``cotune train`` reads back unchanged)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
