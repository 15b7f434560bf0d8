"""Sequence classification and regression: GLUE, FPB, and MMLU as subject (or answer) classification.

Rows: ``{"text": str, "text_pair": str | None, "label": int | float}``. The model is the base encoder (or decoder)
with a sequence-classification head from ``transformers.AutoModelForSequenceClassification`` (via
``cotune.models.load_model``). Loss: cross-entropy over ``num_labels`` classes, or MSE on the single output for
regression (STS-B: ``num_labels=1``). The head reads a sentence-transformers checkpoint's own pooling (``pooling``,
``cotune.tasks.pooling``). GLUE metrics per data set: CoLA Matthews correlation; MRPC and QQP F1 (binary,
positive class 1) and accuracy; STS-B Pearson and Spearman; the others accuracy. FPB: accuracy and macro F1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotune.errors import CotuneError
from cotune.tasks import metrics as M
from cotune.tasks.base import TaskBase, batches, eval_mode, logits_of, model_device, to_device
from cotune.tasks.losses import classification_loss
from cotune.tasks.pooling import apply_pooling, check_choice

PRIMARY = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}
MMLU_SUBJECT_KEYS = ("topic", "subject")


class SeqClsTask(TaskBase):
    """``make_task("seq_cls", "glue/SST-2", "minilm")``; ``make_task("seq_cls", "mmlu", label_key="topic")``."""

    kind = "seq_cls"
    shapes = ("cls", "mc")
    default_max_length = 128

    def __init__(self, data, model=None, *, num_labels: int | None = None, pooling: str = "auto", **kw: Any):
        # MMLU rows: label_key="topic" classifies the subject; otherwise the answer letter is the label
        self._mc_label = "subject" if kw.get("label_key") in MMLU_SUBJECT_KEYS else None
        super().__init__(data, model, **kw)
        self.pooling = check_choice(pooling)
        if self.data.shape == "mc":
            self._setup_mc()
        else:
            spec = self.data.labels
            self.regression = bool(spec.regression)
            self.label_names = None if self.regression else list(spec.names)
        n = 1 if self.regression else len(self.label_names)
        if num_labels is not None and num_labels < n:
            raise CotuneError(f"num_labels={num_labels} but {self.name} has {n} labels: {self.label_names}")
        self.num_labels = num_labels or n
        if self.regression and self.num_labels != 1:
            raise CotuneError("a regression task (STS-B) needs num_labels=1")

    # ---- MMLU as classification

    def _setup_mc(self) -> None:
        self.regression = False
        if self._mc_label == "subject":
            rows = self.data.read(self.data.carve_from or "train", self.on_bad_row).rows
            self.label_names = sorted({r["subject"] for r in rows})
            self.name = f"{self.data.name}-topic"
        else:  # the answer letter, the question as text and the choices as the pair
            self.label_names = ["A", "B", "C", "D"]
            self.name = f"{self.data.name}-answer"

    def convert(self, row: dict) -> dict:
        if self.data.shape != "mc":
            return row
        if self._mc_label == "subject":
            return {"text": row["question"], "text_pair": None, "label": self.label_names.index(row["subject"])}
        pair = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(row["choices"]))
        return {"text": row["question"], "text_pair": pair, "label": row["label"]}

    def default_metric(self) -> str:
        # a regression file of the user's own (``regression=True``, not STS-B) is scored like STS-B
        regression = self.data.shape != "mc" and self.data.labels.regression
        return PRIMARY.get(self.data.task or "", "pearson" if regression else "accuracy")

    # ---- model

    def build_model(self, model: str | None = None) -> nn.Module:
        """The base model with a fresh classification (or 1-output regression) head."""
        from cotune.models import load_model, resolve

        spec = self._model_spec(model)
        kw: dict[str, Any] = {"num_labels": self.num_labels}
        if self.regression:
            kw["problem_type"] = "regression"
        elif self.label_names and len(self.label_names) == self.num_labels:
            kw["id2label"] = dict(enumerate(self.label_names))
            kw["label2id"] = {n: i for i, n in enumerate(self.label_names)}
        m = load_model(spec, "seq_cls", **kw)
        apply_pooling(m, resolve(spec), self.pooling)  # the head reads the checkpoint's sentence embedding
        tok = self.tokenizer
        if getattr(m.config, "pad_token_id", None) is None:
            # decoder models (Llama, GPT-2) pool the last non-pad token and need to know which id pads
            self._ensure_pad(tok)
            m.config.pad_token_id = tok.pad_token_id
        return m

    @staticmethod
    def _ensure_pad(tok) -> None:
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        """Tokenised, padded to the longest row, truncated to ``max_length``; ``labels`` long or float."""
        if not rows:
            raise CotuneError("collate of an empty batch")
        tok = self.tokenizer
        self._ensure_pad(tok)
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows] if rows[0].get("text_pair") is not None else None
        enc = tok(texts, pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = dict(enc)
        if "label" in rows[0]:
            dtype = torch.float32 if self.regression else torch.long
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        return batch

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return logits_of(model(**inputs))

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Mean cross-entropy (classification) or mean squared error (regression) over the batch."""
        return classification_loss(self.logits(model, batch), batch["labels"])

    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int = 32, limit: int | None = None):
        """Metrics on ``rows`` (the first ``limit``): the data set's GLUE metric(s), accuracy, and the mean loss."""
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise CotuneError("evaluate needs at least one row")
        dev = model_device(model)
        preds: list = []
        loss_sum = 0.0
        with eval_mode(model):
            for chunk in batches(rows, batch_size, desc="eval"):
                batch = to_device(self.collate(chunk), dev)
                logits = self.logits(model, batch).float()
                if self.regression:
                    out = logits.squeeze(-1)
                    loss_sum += F.mse_loss(out, batch["labels"], reduction="sum").item()
                    preds += out.tolist()
                else:
                    loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                    preds += logits.argmax(-1).tolist()
        ref = [r["label"] for r in rows]
        out = {"loss": loss_sum / len(rows)}
        if self.regression:
            out.update(
                pearson=M.pearson(preds, ref), spearman=M.spearman(preds, ref), mse=out["loss"],
                pred_spread=M.spread(preds, ref),
            )
        else:
            out["accuracy"] = M.accuracy(preds, ref)
            out.update(M.predicted_classes(preds))  # pred_classes 1: every row gets one class (the trainer warns)
            task = self.data.task or ""
            if task == "cola":
                out["mcc"] = M.mcc(preds, ref)
            if task in ("mrpc", "qqp") or self.num_labels == 2:
                out["f1"] = M.f1(preds, ref, average="binary")
            if self.num_labels > 2:
                out["macro_f1"] = M.f1(preds, ref, average="macro", labels=list(range(self.num_labels)))
        return self.check_metrics(out)
