"""Sequence-to-sequence (T5 / BART family) through ``transformers.AutoModelForSeq2SeqLM``.

Rows: ``{"source": str, "target": str, "final": str | None}`` from question/answer data (E2E: MR -> text, GSM8K,
Alpaca: instruction (+ input) -> output), or from classification data as text -> label name (ColA's FPB
"s2s" setting). Sources are truncated to ``max_length`` tokens; targets are tokenised without the tokenizer's
special tokens and end with its EOS token (SEP for BERT-style tokenizers), truncated to ``max_target_length``.
Loss: the model's own mean cross-entropy over target tokens (labels padded with -100; the decoder input is the
labels shifted right behind ``decoder_start_token_id``). Evaluation: ``loss`` plus greedy generation scored by
ROUGE-L (E2E with all references of an input), exact match (GSM8K) or accuracy (classification data).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cotune.errors import CotuneError
from cotune.tasks import metrics as M
from cotune.tasks.base import TaskBase, batches, eval_mode, model_device, to_device

IGNORE = -100


class Seq2SeqTask(TaskBase):
    """``make_task("seq2seq", "e2e", "path/to/t5-folder")``."""

    kind = "seq2seq"
    shapes = ("qa", "cls")

    def __init__(self, data, model=None, *, max_target_length: int = 128, max_new_tokens: int | None = None,
                 **kw: Any):
        super().__init__(data, model, **kw)
        if self.data.shape == "cls" and self.data.labels.regression:
            raise CotuneError(f"{self.name} is a regression data set; seq2seq needs text targets")
        self.max_target_length = max_target_length
        self.max_new_tokens = max_new_tokens or max_target_length

    def default_metric(self) -> str:
        if self.data.shape == "cls":
            return "accuracy"
        return "exact_match" if self.data.task == "gsm8k" else "rouge_l"

    def convert(self, row: dict) -> dict:
        if self.data.shape == "cls":
            src = row["text"] if row.get("text_pair") is None else f"{row['text']}\n{row['text_pair']}"
            return {"source": src, "target": self.data.labels.names[row["label"]], "final": None}
        if not row["prompt"]:
            raise CotuneError(f"{self.name} is a plain text corpus; seq2seq needs (input, output) pairs")
        return {"source": row["prompt"], "target": row["answer"], "final": row.get("final")}

    def build_model(self, model: str | None = None) -> nn.Module:
        from cotune.models import load_model

        return load_model(self._model_spec(model), "seq2seq")

    def _eos(self) -> int | None:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        if not rows:
            raise CotuneError("collate of an empty batch")
        tok = self.tokenizer
        enc = tok([r["source"] for r in rows], padding=True, truncation=True, max_length=self.max_length,
                  return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        eos = self._eos()
        tgt = []
        for r in rows:
            ids = list(tok(r["target"], add_special_tokens=False)["input_ids"])[: self.max_target_length - 1]
            tgt.append(ids + ([eos] if eos is not None else []))
        T = max(len(t) for t in tgt)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for b, t in enumerate(tgt):
            labels[b, : len(t)] = torch.tensor(t)
        batch["labels"] = labels
        return batch

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The model's mean token cross-entropy over the target tokens."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def generate(self, model: nn.Module, rows: list[dict], batch_size: int = 8) -> list[str]:
        from transformers import GenerationConfig

        tok = self.tokenizer
        dev = model_device(model)
        cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                               eos_token_id=self._eos(), pad_token_id=tok.pad_token_id,
                               decoder_start_token_id=model.config.decoder_start_token_id)
        out: list[str] = []
        with eval_mode(model):
            for chunk in batches(rows, batch_size, desc="generate"):
                enc = tok([r["source"] for r in chunk], padding=True, truncation=True, max_length=self.max_length,
                          return_tensors="pt")
                gen = model.generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                                     generation_config=cfg)
                out += [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
        return out

    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int = 32, limit: int | None = None):
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise CotuneError("evaluate needs at least one row")
        dev = model_device(model)
        loss_sum, n_tok = 0.0, 0
        with eval_mode(model):
            for chunk in batches(rows, batch_size, desc="eval"):
                b = to_device(self.collate(chunk), dev)
                n = int((b["labels"] != IGNORE).sum())
                loss_sum += self.loss(model, b).item() * n  # the model's loss is a token mean: re-weight by tokens
                n_tok += n
        out = {"loss": loss_sum / max(n_tok, 1)}
        gen_bs = max(1, min(batch_size, 8))
        if self.metric == "rouge_l":
            refs: dict[str, list[str]] = {}
            for r in rows:
                refs.setdefault(r["source"], []).append(r["target"])
            preds = self.generate(model, [{"source": s} for s in refs], gen_bs)
            out["rouge_l"] = M.rouge_l(preds, list(refs.values()))
        elif self.metric == "exact_match":
            preds = self.generate(model, rows, gen_bs)
            out["exact_match"] = M.exact_match(preds, [r.get("final") or r["target"] for r in rows])
        elif self.metric == "accuracy":
            preds = self.generate(model, rows, gen_bs)
            out["accuracy"] = sum(p == r["target"] for p, r in zip(preds, rows)) / len(rows)
        return self.check_metrics(out)
