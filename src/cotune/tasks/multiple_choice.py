"""Multiple choice by letter logits at the last prompt token (MMLU-style), with a causal LM.

Rows: ``{"question": str, "choices": [str, ...], "label": int, "subject": str}``.

Prompt (the MMLU paper's format)::

    The following are multiple choice questions (with answers) about {subject}.

    {shot question}
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: B

    {question}
    A. ...
    ...
    Answer:

The prediction is the argmax over the next-token logits of the letter tokens (`` A`` .. `` D``, each a single
token) at the last prompt token. ``n_shot`` examples (default 0) come from the **train** split of the same
subject, in file order, never from the rows being scored; shots are dropped one at a time while the prompt exceeds
``max_length`` (as the MMLU reference code does), then the prompt is cut from the left. Training loss:
cross-entropy over the letter logits at the same position. Batches are left-padded with explicit position ids, so a
padded row's logits equal its unpadded ones, and only the last position's logits are computed when the model
supports ``logits_to_keep``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotune.errors import CotuneError
from cotune.tasks import metrics as M
from cotune.tasks.base import TaskBase, batches, eval_mode, left_pad, logits_of, model_device, to_device

LETTERS = "ABCDEFGHIJ"


def format_question(row: dict, with_answer: bool) -> str:
    lines = [row["question"].strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    ans = f" {LETTERS[row['label']]}\n\n" if with_answer else ""
    return "\n".join(lines) + "\nAnswer:" + ans


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""


class MultipleChoiceTask(TaskBase):
    """``make_task("multiple_choice", "mmlu", "smollm2", n_shot=5)``."""

    kind = "multiple_choice"
    shapes = ("mc",)
    default_max_length = 1024

    def __init__(self, data, model=None, *, n_shot: int = 0, **kw: Any):
        super().__init__(data, model, **kw)
        if n_shot < 0:
            raise CotuneError(f"n_shot must be >= 0, got {n_shot}")
        self.n_shot = n_shot
        self._shots: dict[str, list[dict]] | None = None
        self._letter_ids: list[int] | None = None

    def default_metric(self) -> str:
        return "accuracy"

    def build_model(self, model: str | None = None) -> nn.Module:
        from cotune.models import load_model

        return load_model(self._model_spec(model), "causal_lm")

    # ---- prompts

    def shots_for(self, row: dict) -> list[dict]:
        if self.n_shot == 0:
            return []
        if self._shots is None:
            self._shots = {}
            for r in self.native("train").rows:
                self._shots.setdefault(r["subject"], []).append(r)
        pool = [r for r in self._shots.get(row["subject"], []) if r["question"] != row["question"]]
        return pool[: self.n_shot]

    def prompt(self, row: dict, k: int | None = None) -> str:
        shots = self.shots_for(row)[: self.n_shot if k is None else k]
        return header(row["subject"]) + "".join(format_question(s, True) for s in shots) + format_question(row, False)

    def prompt_ids(self, row: dict) -> list[int]:
        tok = self.tokenizer
        k = len(self.shots_for(row))
        while True:
            ids = tok(self.prompt(row, k))["input_ids"]
            if len(ids) <= self.max_length or k == 0:
                return list(ids[-self.max_length :])
            k -= 1

    def letter_ids(self) -> list[int]:
        """Token ids of `` A``, `` B``, ...: each must be one token (true of BPE tokenizers like SmolLM2's)."""
        if self._letter_ids is None:
            ids = []
            for L in LETTERS:
                t = self.tokenizer(" " + L, add_special_tokens=False)["input_ids"]
                if len(t) != 1:
                    t = self.tokenizer(L, add_special_tokens=False)["input_ids"]
                if len(t) != 1:
                    raise CotuneError(f"the tokenizer splits the answer letter {L!r} into {len(t)} tokens")
                ids.append(t[0])
            self._letter_ids = ids
        return self._letter_ids

    # ---- batches

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        """Left-padded prompts with ``position_ids``; ``labels`` = choice index; ``n_choices`` per row."""
        if not rows:
            raise CotuneError("collate of an empty batch")
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, att = left_pad([self.prompt_ids(r) for r in rows], pad)
        pos = (att.cumsum(1) - 1).clamp(min=0)  # real tokens get positions 0..n-1 whatever the padding
        return {
            "input_ids": ids,
            "attention_mask": att,
            "position_ids": pos,
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
            "n_choices": torch.tensor([len(r["choices"]) for r in rows], dtype=torch.long),
        }

    def choice_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(batch, max choices) next-token logits of the letters at the last prompt token; absent choices -inf."""
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kw["logits_to_keep"] = 1  # the last position is the same column for every left-padded row
        logits = logits_of(model(**kw))[:, -1].float()
        C = int(batch["n_choices"].max())
        sel = logits[:, self.letter_ids()[:C]]
        absent = torch.arange(C, device=sel.device)[None, :] >= batch["n_choices"][:, None]
        return sel.masked_fill(absent, float("-inf"))

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Cross-entropy over the letter logits (mean over the batch)."""
        return F.cross_entropy(self.choice_logits(model, batch), batch["labels"])

    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int = 8, limit: int | None = None):
        """``accuracy`` of the letter argmax, and the mean letter cross-entropy ``loss``."""
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise CotuneError("evaluate needs at least one row")
        dev = model_device(model)
        preds: list[int] = []
        loss_sum = 0.0
        with eval_mode(model):
            for chunk in batches(rows, batch_size, desc="eval"):
                batch = to_device(self.collate(chunk), dev)
                sel = self.choice_logits(model, batch)
                loss_sum += F.cross_entropy(sel, batch["labels"], reduction="sum").item()
                preds += sel.argmax(-1).tolist()
        out = {"accuracy": M.accuracy(preds, [r["label"] for r in rows]), "loss": loss_sum / len(rows)}
        return self.check_metrics(out)
