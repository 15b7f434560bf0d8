"""Multiple choice with a causal LM (MMLU-style), scored by each option's log-likelihood or by letter logits.

Rows: ``{"question": str, "choices": [str, ...], "label": int, "subject": str}``.

``scoring="cloze"`` (the default; lighteval's ``mmlu_cloze``, which SmolLM2's model card reports as
"MMLU (cloze)", and lm-evaluation-harness's ``output_type: multiple_choice`` over the option texts)::

    The following are questions about {subject}.
    Question: {shot question}
    Answer: {shot's correct option}

    Question: {question}
    Answer:

each option ``" {text}"`` is appended to the prompt and scored by the sum of its tokens' log-probabilities.
``accuracy`` is the argmax of that sum (harness ``acc``), ``accuracy_norm`` the argmax of the sum divided by the
option's length in characters without its leading space (lighteval ``acc_norm_nospace``). Training loss:
cross-entropy over the options' summed log-likelihoods.

``scoring="letter"`` (the MMLU paper's format, lm-evaluation-harness's ``mmlu`` task)::

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
token) at the last prompt token, which equals the harness's log-likelihood of each one-token option. Training loss:
cross-entropy over the letter logits at the same position.

Prompt-based classification (MeZO's and LM-BFF's setting): classification rows (``cls``: SST-2, RTE, FPB, ...)
become multiple-choice rows whose options are the label words of ``verbalizer`` (default: the data's label names),
and ``template`` (placeholders ``{text}``, ``{text_pair}``; for multiple-choice rows ``{question}``,
``{subject}``) replaces the cloze prompt, e.g. ``template="{text} It was"``, ``verbalizer=["terrible",
"great"]`` for SST-2: each label word is scored by its log-likelihood after the prompt, through the LM head.

Both: ``n_shot`` examples (default 0) come from the **train** split of the same subject, in file order, never from
the rows being scored; shots are dropped one at a time while the prompt (with its longest option) exceeds
``max_length`` (as the MMLU reference code does), then the prompt is cut from the left. Batches are left-padded with
explicit position ids, so a padded row's scores equal its unpadded ones, and only the last positions' logits are
computed when the model supports ``logits_to_keep``.
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
SCORINGS = ("cloze", "letter")


def format_question(row: dict, with_answer: bool) -> str:
    """The letter format: question, lettered options, ``Answer:`` (and the letter, for a shot)."""
    lines = [row["question"].strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    ans = f" {LETTERS[row['label']]}\n\n" if with_answer else ""
    return "\n".join(lines) + "\nAnswer:" + ans


def format_cloze(row: dict, with_answer: bool) -> str:
    """The cloze format: ``Question: ...`` / ``Answer:`` (and the correct option's text, for a shot)."""
    ans = f" {row['choices'][row['label']]}\n\n" if with_answer else ""
    return f"Question: {row['question'].strip()}\nAnswer:" + ans


def header(subject: str, scoring: str = "letter") -> str:
    if not subject:
        return ""
    if scoring == "cloze":
        return f"The following are questions about {subject}.\n"
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


class MultipleChoiceTask(TaskBase):
    """``make_task("multiple_choice", "mmlu", "smollm2", n_shot=5)``; ``scoring="letter"`` for letter logits."""

    kind = "multiple_choice"
    shapes = ("mc", "cls")
    default_max_length = 1024

    def __init__(self, data, model=None, *, n_shot: int = 0, scoring: str = "cloze", template: str | None = None,
                 verbalizer: list[str] | None = None, **kw: Any):
        super().__init__(data, model, **kw)
        if n_shot < 0:
            raise CotuneError(f"n_shot must be >= 0, got {n_shot}")
        if scoring not in SCORINGS:
            raise CotuneError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
        if template is not None and scoring != "cloze":
            raise CotuneError("template sets the cloze prompt; use it with scoring=cloze")
        self.verbalizer: list[str] | None = None
        if self.data.shape == "cls":
            labels = self.data.labels
            if labels is None or labels.regression:
                raise CotuneError(f"{self.name} has no class labels; multiple_choice needs a label word per class")
            words = [str(w) for w in (verbalizer or labels.names)]
            if len(words) != len(labels.names):
                raise CotuneError(f"verbalizer has {len(words)} words for {len(labels.names)} classes "
                                  f"({', '.join(labels.names)}): give one word per class, in that order")
            self.verbalizer = words
        elif verbalizer is not None:
            raise CotuneError(f"verbalizer maps class labels to words; {self.name} holds {self.data.shape} rows")
        self.n_shot = n_shot
        self.scoring = scoring
        self.template = template
        if template is not None:
            self._fill(template, {"text": "", "text_pair": "", "question": "", "subject": ""})
        self._shots: dict[str, list[dict]] | None = None
        self._letter_ids: list[int] | None = None

    def default_metric(self) -> str:
        return "accuracy"

    def convert(self, row: dict) -> dict:
        if self.verbalizer is None:
            return row
        return {**row, "question": row["text"], "choices": self.verbalizer, "subject": ""}

    @staticmethod
    def _fill(template: str, row: dict) -> str:
        try:
            return template.format_map({k: v if v is not None else "" for k, v in row.items()})
        except (KeyError, IndexError, ValueError) as e:
            raise CotuneError(f"template {template!r}: {e!r}; its placeholders are {{text}}, {{text_pair}} "
                              "(classification rows) or {question}, {subject} (multiple-choice rows)") from None

    def build_model(self, model: str | None = None) -> nn.Module:
        from cotune.models import load_model

        return load_model(self._model_spec(model), "causal_lm")

    # ---- prompts

    def shots_for(self, row: dict) -> list[dict]:
        if self.n_shot == 0:
            return []
        if self._shots is None:
            self._shots = {}
            for r in map(self.convert, self.native("train").rows):
                self._shots.setdefault(r["subject"], []).append(r)
        pool = [r for r in self._shots.get(row["subject"], []) if r["question"] != row["question"]]
        return pool[: self.n_shot]

    def prompt(self, row: dict, k: int | None = None) -> str:
        shots = self.shots_for(row)[: self.n_shot if k is None else k]
        if self.template is not None:
            done = "".join(f"{self._fill(self.template, s)} {s['choices'][s['label']].strip()}\n\n" for s in shots)
            return done + self._fill(self.template, row)
        fmt = format_cloze if self.scoring == "cloze" else format_question
        return header(row["subject"], self.scoring) + "".join(fmt(s, True) for s in shots) + fmt(row, False)

    def option_ids(self, row: dict) -> list[list[int]]:
        """Token ids of each option's continuation ``" {text}"`` (cloze scoring)."""
        tok = self.tokenizer
        out = [list(tok(" " + c.strip(), add_special_tokens=False)["input_ids"]) for c in row["choices"]]
        if any(not ids for ids in out):
            raise CotuneError(f"an option of {row['question'][:60]!r} encodes to no token")
        return out

    def prompt_ids(self, row: dict) -> list[int]:
        tok = self.tokenizer
        room = self.max_length - (max(map(len, self.option_ids(row))) if self.scoring == "cloze" else 0)
        if room < 1:
            raise CotuneError(f"max_length {self.max_length} leaves no room for the prompt of an option this long; "
                              "raise task.options.max_length")
        k = len(self.shots_for(row))
        while True:
            ids = tok(self.prompt(row, k))["input_ids"]
            if len(ids) <= room or k == 0:
                return list(ids[-room:])
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
        """Left-padded prompts with ``position_ids``; ``labels`` = choice index; ``n_choices`` per row.

        Cloze scoring adds one sequence per (row, option), rows' options in order: ``option_ids`` right-padded
        with ``option_mask``, ``option_row`` (its prompt's row) and ``option_chars`` (its length in characters).
        """
        if not rows:
            raise CotuneError("collate of an empty batch")
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, att = left_pad([self.prompt_ids(r) for r in rows], pad)
        pos = (att.cumsum(1) - 1).clamp(min=0)  # real tokens get positions 0..n-1 whatever the padding
        batch = {
            "input_ids": ids,
            "attention_mask": att,
            "position_ids": pos,
            "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
            "n_choices": torch.tensor([len(r["choices"]) for r in rows], dtype=torch.long),
        }
        if self.scoring == "cloze":
            opts = [(i, c, o) for i, r in enumerate(rows) for c, o in zip(r["choices"], self.option_ids(r), strict=True)]
            width = max(len(o) for _, _, o in opts)
            batch["option_ids"] = torch.tensor([o + [pad] * (width - len(o)) for _, _, o in opts], dtype=torch.long)
            batch["option_mask"] = torch.tensor([[1] * len(o) + [0] * (width - len(o)) for _, _, o in opts])
            batch["option_row"] = torch.tensor([i for i, _, _ in opts], dtype=torch.long)
            batch["option_chars"] = torch.tensor([max(len(c.strip()), 1) for _, c, _ in opts], dtype=torch.float32)
        return batch

    def _last_logits(self, model: nn.Module, batch: dict, keep: int) -> torch.Tensor:
        """Logits of the prompts' last ``keep`` positions (the same columns for every left-padded row)."""
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kw["logits_to_keep"] = keep
        return logits_of(model(**kw))[:, -keep:].float()

    def _by_row(self, batch: dict, flat: torch.Tensor) -> torch.Tensor:
        """(rows, max choices) from one value per (row, option) sequence; absent choices -inf."""
        n = batch["n_choices"]
        C = int(n.max())
        out = flat.new_full((len(n), C), float("-inf"))
        mask = torch.arange(C, device=n.device)[None, :] < n[:, None]
        out[mask] = flat
        return out

    def option_logliks(self, model: nn.Module, batch: dict, share_prefix: bool | None = None) -> torch.Tensor:
        """(options,) summed log-probability of each option's tokens given its prompt (cloze batches).

        ``share_prefix`` (default: when autograd is off, i.e. evaluation and zeroth-order steps): each prompt runs
        once and its key/value cache is copied to its options, about ``n_choices`` times fewer tokens; otherwise
        every option runs with its own copy of the prompt in one forward (no cache, so gradient checkpointing and
        gradient capture see a plain forward).
        """
        if share_prefix is None:
            share_prefix = not torch.is_grad_enabled()
        rows, opt, om = batch["option_row"], batch["option_ids"], batch["option_mask"]
        prompt, pm = batch["input_ids"], batch["attention_mask"]
        att = torch.cat([pm[rows], om], 1)
        opt_pos = pm.sum(1)[rows][:, None] + torch.arange(opt.shape[1], device=opt.device)[None, :]
        params = inspect.signature(model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24 renamed it
        if share_prefix and cache_kw in params:
            from transformers import DynamicCache

            cache = DynamicCache()
            kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
            out = model(input_ids=prompt, attention_mask=pm, position_ids=batch["position_ids"], use_cache=True,
                        **{cache_kw: cache}, **kw)
            first = logits_of(out)[:, -1][rows]
            cache.batch_select_indices(rows)  # each option continues its own prompt's cache
            rest = logits_of(model(input_ids=opt, attention_mask=att, position_ids=opt_pos, use_cache=True,
                                   **{cache_kw: cache}))
            logits = torch.cat([first[:, None], rest[:, :-1]], 1)
        else:
            full = {"input_ids": torch.cat([prompt[rows], opt], 1), "attention_mask": att,
                    "position_ids": torch.cat([batch["position_ids"][rows], opt_pos], 1)}
            logits = self._last_logits(model, full, opt.shape[1] + 1)[:, :-1]  # predicts the option's tokens
        lp = torch.log_softmax(logits.float(), -1).gather(-1, opt.unsqueeze(-1)).squeeze(-1)
        return (lp * om).sum(-1)

    def choice_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(batch, max choices) next-token logits of the letters at the last prompt token; absent choices -inf."""
        logits = self._last_logits(model, batch, 1)[:, -1]
        C = int(batch["n_choices"].max())
        sel = logits[:, self.letter_ids()[:C]]
        absent = torch.arange(C, device=sel.device)[None, :] >= batch["n_choices"][:, None]
        return sel.masked_fill(absent, float("-inf"))

    def choice_scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(batch, max choices): options' summed log-likelihoods (cloze) or letter logits (letter)."""
        if self.scoring == "cloze":
            return self._by_row(batch, self.option_logliks(model, batch))
        return self.choice_logits(model, batch)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Cross-entropy over the choice scores (mean over the batch)."""
        return F.cross_entropy(self.choice_scores(model, batch), batch["labels"])

    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int = 8, limit: int | None = None):
        """``accuracy`` of the score argmax (cloze: also ``accuracy_norm``, per character), and the mean ``loss``."""
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise CotuneError("evaluate needs at least one row")
        dev = model_device(model)
        preds: list[int] = []
        norm_preds: list[int] = []
        loss_sum = 0.0
        with eval_mode(model):
            for chunk in batches(rows, batch_size, desc="eval"):
                batch = to_device(self.collate(chunk), dev)
                if self.scoring == "cloze":
                    flat = self.option_logliks(model, batch)
                    sel = self._by_row(batch, flat)
                    norm_preds += self._by_row(batch, flat / batch["option_chars"]).argmax(-1).tolist()
                else:
                    sel = self.choice_logits(model, batch)
                loss_sum += F.cross_entropy(sel, batch["labels"], reduction="sum").item()
                preds += sel.argmax(-1).tolist()
        gold = [r["label"] for r in rows]
        out = {"accuracy": M.accuracy(preds, gold), "loss": loss_sum / len(rows)}
        if norm_preds:
            out["accuracy_norm"] = M.accuracy(norm_preds, gold)
        return self.check_metrics(out)
