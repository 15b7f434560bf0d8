"""The task interface the trainer relies on, and the shared machinery of every task type.

A :class:`Task` is one object per (task type, data set). It loads splits as plain rows, builds the base model
with the right head, collates rows into tensors, computes the training loss with a forward pass only, and
evaluates. Tasks know nothing of engines or adapters: an engine calls ``task.loss(model, batch)``.

Options every task type accepts (through :func:`make_task`):

* ``on_bad_row``: ``"error"`` (default; a malformed row raises naming file and line) or ``"skip"`` (counted in
  ``Split.skipped``);
* ``max_rows``: keep at most this many rows of each split (the first ones, after carving);
* ``seed`` / ``val_fraction`` / ``test_fraction``: the deterministic held-out carving (see
  :mod:`cotune.tasks.catalog`);
* ``data_root``: where short names such as ``glue/SST-2`` are looked up first;
* ``tokenizer``: a tokenizer object (else the model's, loaded lazily from ``model``);
* ``max_length``: token limit of one example; ``metric``: override the primary metric;
* label options for classification data: ``labels`` (list), ``text_key``, ``text_pair_key``, ``label_key``,
  ``encoding``, ``regression``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from cotune.errors import CotuneError
from cotune.tasks.catalog import DataSet, resolve_data
from cotune.tasks.metrics import GREATER_IS_BETTER


@dataclass
class Split:
    """One split's rows, already parsed."""

    rows: list[dict]  # e.g. {"text": ..., "text_pair": ..., "label": 1} or {"prompt": ..., "answer": ...}
    source: str  # file path or hub name, for messages
    skipped: int = 0  # malformed rows skipped in the split's source file (when on_bad_row="skip")

    def __len__(self) -> int:
        return len(self.rows)


@runtime_checkable
class Task(Protocol):
    """One object per (task type, data set)."""

    name: str  # e.g. "glue-sst2"
    kind: str  # "seq_cls" | "causal_lm" | "multiple_choice" | "image_cls" | "seq2seq"
    metric: str  # primary metric used for best-checkpoint selection, e.g. "accuracy"
    greater_is_better: bool

    def load(self, split: str) -> Split: ...

    def build_model(self, model: str) -> nn.Module: ...

    def collate(self, rows: list[dict]) -> dict[str, Any]: ...

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor: ...

    def evaluate(
        self, model: nn.Module, rows: list[dict], batch_size: int = 32, limit: int | None = None
    ) -> dict[str, float]: ...


TASK_TYPES = {
    "seq_cls": "cotune.tasks.seq_cls:SeqClsTask",
    "causal_lm": "cotune.tasks.causal_lm:CausalLMTask",
    "multiple_choice": "cotune.tasks.multiple_choice:MultipleChoiceTask",
    "image_cls": "cotune.tasks.image_cls:ImageClsTask",
    "seq2seq": "cotune.tasks.seq2seq:Seq2SeqTask",
}
ALIASES = {"cls": "seq_cls", "sc": "seq_cls", "clm": "causal_lm", "mc": "multiple_choice", "ic": "image_cls",
           "s2s": "seq2seq"}


def make_task(kind: str, data: str, model: str | None = None, **options: Any) -> Task:
    """The task of type ``kind`` on ``data`` (a local path, a known short name, or a hub name when online).

    ``model`` names the base model whose tokenizer the task uses (and the default for ``build_model``).
    Unknown options raise a :class:`CotuneError` listing the valid ones for that task type.
    """
    kind = ALIASES.get(kind, kind)
    if kind not in TASK_TYPES:
        raise CotuneError(f"unknown task type {kind!r}; valid: {', '.join(TASK_TYPES)}")
    mod, _, cls_name = TASK_TYPES[kind].partition(":")
    cls = getattr(importlib.import_module(mod), cls_name)
    valid = _accepted_options(cls)
    bad = sorted(set(options) - valid)
    if bad:
        raise CotuneError(f"unknown option(s) {', '.join(bad)} for task type {kind}; valid: {', '.join(sorted(valid))}")
    return cls(data, model, **options)


def _accepted_options(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind == p.KEYWORD_ONLY:
                names.add(p.name)
    return names


class TaskBase:
    """Shared parts: data resolution, split loading with carving, tokenizer, device moves, metric choice."""

    kind = ""
    shapes: tuple[str, ...] = ()  # native row shapes this task type can use
    default_max_length = 256

    def __init__(
        self,
        data: str | DataSet,
        model: str | None = None,
        *,
        tokenizer: Any = None,
        max_length: int | None = None,
        on_bad_row: str = "error",
        max_rows: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        data_root: str | None = None,
        metric: str | None = None,
        labels: list | None = None,
        text_key: str | None = None,
        text_pair_key: str | None = None,
        label_key: str | None = None,
        encoding: str | None = None,
        regression: bool = False,
    ):
        if on_bad_row not in ("error", "skip"):
            raise CotuneError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
        self.options = {"labels": labels, "text_key": text_key, "text_pair_key": text_pair_key,
                        "label_key": label_key, "encoding": encoding, "regression": regression}
        self.data = data if isinstance(data, DataSet) else resolve_data(data, data_root=data_root, **self.options)
        if self.shapes and self.data.shape not in self.shapes:
            raise CotuneError(
                f"{self.data.name} holds {self.data.shape} rows, which task type {self.kind} cannot use "
                f"(it takes {', '.join(self.shapes)} data); {_suggest(self.data.shape)}"
            )
        self.name = self.data.name
        self.model_spec = model
        self._tokenizer = tokenizer
        self.max_length = max_length or self.default_max_length
        self.on_bad_row = on_bad_row
        self.max_rows = max_rows
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.metric = metric or self.default_metric()
        self.greater_is_better = GREATER_IS_BETTER.get(self.metric, True)

    # ---- data

    def default_metric(self) -> str:
        raise NotImplementedError

    def native(self, split: str):
        return self.data.split(split, on_bad_row=self.on_bad_row, seed=self.seed, val_fraction=self.val_fraction,
                               test_fraction=self.test_fraction)

    def load(self, split: str) -> Split:
        """Rows of ``split`` (``train`` | ``validation`` | ``test``) in this task type's row schema."""
        nat = self.native(split)
        rows = nat.rows[: self.max_rows] if self.max_rows is not None else nat.rows
        return Split([self.convert(r) for r in rows], nat.source, nat.skipped)

    def convert(self, row: dict) -> dict:
        """A native row (see :mod:`cotune.tasks.formats`) in this task type's schema."""
        return row

    # ---- model side

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.model_spec is None:
                raise CotuneError(f"task {self.name} ({self.kind}) needs a tokenizer: pass model= or tokenizer=")
            from cotune.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_spec)
        return self._tokenizer

    def _model_spec(self, model: str | None) -> str:
        spec = model or self.model_spec
        if spec is None:
            raise CotuneError(f"build_model needs a model name or folder for task {self.name}")
        if self.model_spec is None and self._tokenizer is None:
            self.model_spec = spec  # the tokenizer comes from the model the user built
        return spec

    def check_metrics(self, out: dict[str, float]) -> dict[str, float]:
        if self.metric not in out:
            raise CotuneError(f"metric {self.metric!r} is not computed for {self.name}; available: {', '.join(out)}")
        return out


def _suggest(shape: str) -> str:
    return {
        "cls": "use seq_cls",
        "qa": "use causal_lm or seq2seq",
        "mc": "use multiple_choice (or seq_cls with label_key='topic')",
        "image": "use image_cls",
    }[shape]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with every tensor moved to ``device`` (other values untouched)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batches(rows: list[dict], batch_size: int, desc: str | None = None) -> Iterator[list[dict]]:
    """``rows`` in batches; with ``desc``, under a progress bar of that name (see ``cotune.tasks.progress``)."""
    if batch_size < 1:
        raise CotuneError(f"batch_size must be >= 1, got {batch_size}")
    if desc is not None:
        from cotune.tasks.progress import chunks

        yield from chunks(rows, batch_size, desc)  # type: ignore[misc]
        return
    for i in range(0, len(rows), batch_size):
        yield rows[i : i + batch_size]


class eval_mode:
    """``model.eval()`` + ``torch.no_grad()`` for the block, restoring the previous train/eval mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.ng = torch.no_grad()
        self.ng.__enter__()
        return self.model

    def __exit__(self, *exc):
        self.ng.__exit__(*exc)
        self.model.train(self.was_training)
        return False


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded on the left: every sequence ends in the last column
    (what a decoder reading its last position needs)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, x in enumerate(seqs):
        ids[b, width - len(x) :] = torch.tensor(list(x), dtype=torch.long)
        mask[b, width - len(x) :] = 1
    return ids, mask


def logits_of(out: Any) -> torch.Tensor:
    """Logits from a transformers output object, a dict, or a plain tensor (the image models)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out.logits
