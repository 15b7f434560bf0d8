"""What one job trains on: its task (``cotune.tasks``), its rows in a replayable order, its adapters and head.

The service turns a job's data reference into a ``cotune.tasks`` task *without* letting the job name
arbitrary server paths: uploads and data-root paths arrive here already resolved by the API, and hub names
go straight to ``datasets`` (never through the local short-name lookup). Task options that would reach the
file system (``data_root``) or override the service's own settings are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.errors import CotuneError
from cotune.service.store import atomic_write_json
from cotune.tasks.order import step_rows

#: the task kinds a server trains, by how its base model is loaded (``model_task_for``): an encoder is loaded
#: with a sequence-classification head (each job gets its own head), a causal LM with its LM head (shared)
SERVICE_TASKS = {"seq_cls": ("seq_cls",), "causal_lm": ("causal_lm",)}
#: ``task_options`` a job may pass to ``make_task`` (nothing that names server paths or objects)
ALLOWED_TASK_OPTIONS = (
    "labels", "text_key", "text_pair_key", "label_key", "encoding", "regression", "on_bad_row", "max_rows",
    "val_fraction", "test_fraction", "num_labels", "metric", "system", "chat_template", "prompt_format",
    "max_new_tokens",
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:[A-Za-z0-9._-]+)?$")
META = "meta.json"


def model_task_for(model: str) -> str:
    """How the shared base model is loaded: ``causal_lm`` for a decoder with an LM head, else ``seq_cls``."""
    import transformers

    from cotune.models import resolve

    archs = transformers.AutoConfig.from_pretrained(resolve(model)).architectures or []
    return "causal_lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "seq_cls"


def check_task_options(options: dict[str, Any]) -> None:
    bad = sorted(set(options) - set(ALLOWED_TASK_OPTIONS))
    if bad:
        raise CotuneError(f"task_options {bad} are not accepted by the service; allowed: {list(ALLOWED_TASK_OPTIONS)}")


def check_adapter_size(model: nn.Module, configs: list[Any], limit: int | None) -> None:
    """Refuse, before anything is built, a job whose adapters have a rank above the width of a layer they adapt
    or more parameters than ``limit`` (``None``: the base model's size); counted on the meta device."""
    from cotune.adapters.attach import plan_adapters
    from cotune.adapters.site import io_widths

    plan = plan_adapters(model, configs)
    for ad in plan:
        r = getattr(ad.config, "r", None)
        width = min(io_widths(ad.base))
        if isinstance(r, int) and r > width:
            raise CotuneError(f"adapter rank r={r} is above the width {width} of {ad.path}: a rank can be at most "
                              f"the layer's smaller dimension; lower adapter.r")
    total = sum(ad.parameters for ad in plan)
    limit = limit if limit is not None else sum(p.numel() for p in model.parameters())
    if total > limit:
        raise CotuneError(f"the adapter would have {total:,} parameters; this server accepts at most {limit:,} per "
                          "job: lower the rank or adapt fewer modules (adapter.target_modules)")


def hub_dataset(name: str, split: str | None, options: dict[str, Any]) -> Any:
    """A hub data set by name, loaded with ``datasets`` only (no local path lookup)."""
    if not _HUB_NAME.match(name) or ".." in name:
        raise CotuneError(f"hub data set name {name!r} is not of the form owner/name[:config]")
    from cotune.tasks.hub import from_hub, hub_offline

    if hub_offline():
        raise CotuneError(f"the server is offline (HF_HUB_OFFLINE=1): it cannot load {name!r} from the hub")
    repo, _, config = name.partition(":")
    opts = {k: options[k] for k in ("labels", "text_key", "text_pair_key", "label_key", "regression") if k in options}
    return from_hub(repo, config or None, name=name, **opts)


class Workload:
    """A job's task, rows, adapter configs and head, plus its deterministic batch order.

    ``batch(step)`` depends only on (seed, step) and is the batch ``cotune train`` takes at that step
    (``cotune.tasks.order.step_rows``); the data is split into train / validation as ``cotune train`` splits it
    (by the task's own seed option, not the job's).
    """

    def __init__(self, spec: dict[str, Any], data: dict[str, Any] | None, tokenizer: Any, model: nn.Module,
                 model_task: str, job_dir: Path) -> None:
        from cotune.adapters.methods import method_configs

        self.spec = spec
        self.kind = spec.get("task") or model_task
        if self.kind not in SERVICE_TASKS[model_task]:
            what = "a causal LM" if model_task == "causal_lm" else "an encoder"
            raise CotuneError(f"task {self.kind!r} cannot be trained on this server: its base model is {what}, "
                              f"which trains task {' or '.join(SERVICE_TASKS[model_task])}")
        options = dict(spec.get("task_options") or {})
        check_task_options(options)
        self.tokenizer = tokenizer
        self.max_length = int(spec.get("max_length", 128))
        self.batch_size = int(spec.get("batch_size", 8))
        self.seed = int(spec.get("seed", 0))
        self.task: Any = None
        self.train_rows: list[dict] = []
        self.eval_rows: list[dict] = []
        # The bank gives every job its own fresh head (``head``), replacing any head config of the method.
        self.adapter_configs = method_configs(spec.get("method", "lowrank"), model, **(spec.get("adapter") or {}))
        if data is None:  # a finished job reloaded for predictions: what it learned is in meta.json
            meta = json.loads((job_dir / META).read_text())
        else:
            meta = self._load_data(data, options, job_dir)
        self.label_names: list[str] | None = meta["label_names"]
        self.regression: bool = meta["regression"]
        self.num_labels: int | None = meta["num_labels"]
        #: a classification job's own fresh head; a causal-LM job shares the base's LM head
        self.head = self.num_labels if self.kind == "seq_cls" else None
        #: training rows longer than ``max_length`` (cut by the task: the answer keeps at least half)
        self.truncated_rows: int = int(meta.get("truncated_rows", 0))
        #: data the job trains on but probably should not (one class, fewer rows than a batch): name -> message
        self.warnings: dict[str, str] = dict(meta.get("warnings") or {})
        #: the system message its chat requests get when they bring none (the job's own training prompt)
        self.system: str | None = options.get("system")

    def _load_data(self, data: dict[str, Any], options: dict[str, Any], job_dir: Path) -> dict[str, Any]:
        from cotune.tasks.base import make_task

        common = {"tokenizer": self.tokenizer, "max_length": self.max_length}
        train_ref = data["train"]
        source = hub_dataset(train_ref["hub"], train_ref.get("split"), options) if train_ref.get("hub") else train_ref["path"]
        self.task = make_task(self.kind, source, **common, **options)
        self.train_rows = self.task.load("train").rows
        if not self.train_rows:
            raise CotuneError("the training data has no rows")
        if data.get("eval"):
            ref = data["eval"]
            src = hub_dataset(ref["hub"], ref.get("split"), options) if ref.get("hub") else ref["path"]
            # every row of a separate evaluation file is used: no carving
            same = {"labels": self.task.label_names} if self.kind == "seq_cls" else {}  # the training file's classes
            ev = make_task(self.kind, src, **common, **{**options, "val_fraction": 0.0, "test_fraction": 0.0, **same})
            self.eval_rows = ev.load("validation" if ref.get("hub") else "train").rows
        else:
            try:
                self.eval_rows = self.task.load("validation").rows
            except CotuneError:
                self.eval_rows = []
        classifies = self.kind == "seq_cls"
        overlong = 0 if classifies else self.task.overlong(self.train_rows)
        warnings: dict[str, str] = {}  # metric name -> what to tell the tenant
        if classifies and not self.task.regression and len({r["label"] for r in self.train_rows}) < 2:
            warnings["warning_one_class"] = ("the training rows all have one class: the job learns to answer it "
                                             "always; add rows of the other classes")
        if len(self.train_rows) < self.batch_size:
            warnings["warning_tiny_data"] = (f"only {len(self.train_rows)} training rows, fewer than batch_size="
                                             f"{self.batch_size}: every step repeats them")
        meta = {"label_names": self.task.label_names if classifies else None,
                "regression": bool(self.task.regression) if classifies else False,
                "num_labels": int(self.task.num_labels) if classifies else None, "task": self.kind,
                "train_rows": len(self.train_rows), "truncated_rows": overlong, "warnings": warnings,
                "eval_rows": len(self.eval_rows), "source": self.task.name}
        atomic_write_json(job_dir / META, meta)
        return meta

    # -- training ------------------------------------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The collated rows of training step ``step`` (replayable after a restart)."""
        idx = step_rows(len(self.train_rows), self.batch_size, self.seed, step)
        return self.task.collate([self.train_rows[i] for i in idx])

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_rows)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {k: float(v) for k, v in self.task.evaluate(model, self.eval_rows).items()}

    # -- predictions --------------------------------------------------------------------------------------------
    @property
    def predicts_labels(self) -> bool:
        """Classification (``predict``); a causal-LM job generates (``/v1/completions``) instead."""
        return self.kind == "seq_cls"

    def encode_for_predict(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length or self.max_length,
                             return_tensors="pt")
        return dict(enc)

    def decode_logits(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        logits = logits.float()
        if self.regression:
            return [{"value": float(v)} for v in logits.squeeze(-1).tolist()]
        probs = torch.softmax(logits, -1)
        out = []
        for row in probs.tolist():
            i = max(range(len(row)), key=row.__getitem__)
            name = self.label_names[i] if self.label_names and i < len(self.label_names) else str(i)
            out.append({"label": name, "label_id": i, "scores": [round(x, 6) for x in row]})
        return out


def build_workload(spec: dict[str, Any], data: dict[str, Any] | None, tokenizer: Any, model: nn.Module,
                   model_task: str, job_dir: Path) -> Workload:
    """The job's workload; ``data=None`` rebuilds a finished job's for predictions from its ``meta.json``."""
    return Workload(spec, data, tokenizer, model, model_task, job_dir)
