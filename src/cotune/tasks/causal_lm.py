"""Causal-LM instruction tuning (Alpaca, GSM8K, E2E) and plain language modelling (C4, wiki text).

Rows: ``{"prompt": str, "answer": str, "final": str | None}``.

Encoding. With a tokenizer that has a chat template (SmolLM2-Instruct), the prompt is the template applied to a
user turn with the generation prompt (``<|im_start|>assistant\\n``), and the answer is the rest of the template
applied to the full conversation (the answer text and the end-of-turn token, e.g. ``...<|im_end|>``; the
template's trailing newline is dropped). Without a template the prompt is ``prompt_format`` (default
``"{prompt}\\n"``) and the answer is the answer text followed by the EOS token. Prompt and answer are tokenised
separately and concatenated, so the boundary is exact; ``add_special_tokens=False`` is passed when the rendered
text already begins with the BOS token (the template added it), else the tokenizer adds its own. Labels are -100 on
every prompt (and padding) token: **the loss is on answer tokens only** (plain text rows have an empty prompt, so
every token counts). Too long: the answer keeps at least half of ``max_length``, the prompt is cut from the left.

Conversations (ShareGPT ``conversations``, OpenAI ``messages``: rows with ``messages``) always go through the
tokenizer's chat template. Each assistant turn is located by rendering the dialogue up to it (with the generation
prompt) and up to its end; the text is tokenised piece by piece, and the labels keep **every assistant turn's
tokens** (its content and end-of-turn token) and mask everything else (system, user turns, role headers). For
generation the prompt is the dialogue before the last assistant turn; the reference is that turn. Too long: the
last assistant turn keeps at least half of ``max_length`` and the history is cut from the left.

Evaluation. ``loss`` (mean NLL per answer token over the rows) and ``perplexity`` always; plus, by generation,
``rouge_l`` (Alpaca, E2E, prompt/completion data; E2E rows with the same input are scored against all their
references) or ``exact_match`` (GSM8K: numeric answer extraction, see :mod:`cotune.tasks.metrics`). Generation is
greedy, left-padded, at most ``max_new_tokens`` new tokens, stopping at EOS / end of turn.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from cotune.errors import CotuneError
from cotune.tasks import metrics as M
from cotune.tasks.base import TaskBase, batches, eval_mode, left_pad, logits_of, model_device, to_device
from cotune.tasks.losses import IGNORE, next_token_loss, next_token_nll


class CausalLMTask(TaskBase):
    """``make_task("causal_lm", "alpaca", "smollm2")``."""

    kind = "causal_lm"
    shapes = ("qa",)
    default_max_length = 512

    def __init__(
        self,
        data,
        model=None,
        *,
        max_new_tokens: int | None = None,
        chat_template: bool | None = None,
        system: str | None = None,
        prompt_format: str = "{prompt}\n",
        **kw: Any,
    ):
        super().__init__(data, model, **kw)
        self.max_new_tokens = max_new_tokens or (256 if self.data.task == "gsm8k" else 64)
        self.use_template = chat_template
        self.system = system
        self.prompt_format = prompt_format

    def default_metric(self) -> str:
        task = self.data.task
        if task == "gsm8k":
            return "exact_match"
        if task == "text":
            return "loss"
        return "rouge_l"

    def build_model(self, model: str | None = None) -> nn.Module:
        from cotune.models import load_model

        m = load_model(self._model_spec(model), "causal_lm")
        tok = self.tokenizer
        self._ensure_pad(tok)
        if getattr(m.config, "pad_token_id", None) is None:
            m.config.pad_token_id = tok.pad_token_id
        return m

    @staticmethod
    def _ensure_pad(tok) -> None:
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token

    # ---- encoding

    def _templated(self, row: dict) -> bool:
        has = getattr(self.tokenizer, "chat_template", None) is not None
        if self.use_template is True and not has:
            raise CotuneError("chat_template=True but the tokenizer has no chat template")
        return bool(row["prompt"]) and has and self.use_template is not False

    def render(self, row: dict) -> tuple[str, str, bool]:
        """(prompt text, answer text, answer already ends with the end-of-turn token)."""
        tok = self.tokenizer
        if self._templated(row):
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": row["prompt"]}
            ]
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row["answer"]}], tokenize=False)
            if full.startswith(prompt):
                return prompt, full[len(prompt) :].rstrip("\n"), True
            return prompt, row["answer"], False  # a template that rewrites earlier turns: plain answer + EOS
        prompt = self.prompt_format.format(prompt=row["prompt"]) if row["prompt"] else ""
        return prompt, row["answer"], False

    def _chat_messages(self, messages: list[dict]) -> list[dict]:
        if getattr(self.tokenizer, "chat_template", None) is None or self.use_template is False:
            raise CotuneError(
                "conversation data (ShareGPT conversations / OpenAI messages) is rendered with the tokenizer's chat "
                "template: use a model whose tokenizer has one (e.g. smollm2) and leave chat_template unset"
            )
        if self.system and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def chat_pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The templated dialogue as consecutive ``(text, is an assistant turn)`` pieces."""
        tok = self.tokenizer
        msgs = self._chat_messages(messages)
        pieces: list[tuple[str, bool]] = []
        done = ""  # the text covered so far
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True) if k else ""
            full = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
            if not (head.startswith(done) and full.startswith(head)):
                raise CotuneError(
                    "this tokenizer's chat template rewrites earlier turns, so assistant turns cannot be located; "
                    "train on prompt/answer rows instead"
                )
            turn = full[len(head) :].rstrip("\n")  # the template's newline after the end-of-turn is not learnt
            pieces += [(head[len(done) :], False), (turn, True)]
            done = head + turn
        return [(t, lab) for t, lab in pieces if t]

    def _encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        tok = self.tokenizer
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        for i, (text, learn) in enumerate(self.chat_pieces(messages)):
            part = self._ids(text) if i == 0 else list(tok(text, add_special_tokens=False)["input_ids"])
            ids.append(part)
            labels.append(part if learn else [IGNORE] * len(part))
        p = [t for part in ids[:-1] for t in part]
        lp = [t for part in labels[:-1] for t in part]
        return p, lp, ids[-1]  # the last assistant turn is the answer that keeps its room

    def _chat_prompt(self, messages: list[dict]) -> str:
        msgs = self._chat_messages(messages)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return self.tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)

    def _ids(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text)

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one row, cut to ``max_length``; labels are -100 on the prompt tokens."""
        p, lp, a = self.encode_full(row)
        L = self.max_length
        if len(p) + len(a) > L:  # the answer keeps at least half, the prompt loses its start
            keep_a = min(len(a), max(L - len(p), L // 2))
            a = a[:keep_a]
            cut = len(p) - (L - keep_a) if L - keep_a > 0 else len(p)
            p, lp = p[cut:], lp[cut:]
        return p + a, lp + a

    def encode_full(self, row: dict) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, prompt labels, answer ids) of one row, not cut."""
        tok = self.tokenizer
        if row.get("messages"):
            return self._encode_chat(row["messages"])
        prompt, answer, closed = self.render(row)
        p = self._ids(prompt)  # an empty prompt gives [] or just the BOS token
        a = list(tok(answer, add_special_tokens=False)["input_ids"])
        if not closed and tok.eos_token_id is not None:
            a.append(tok.eos_token_id)
        if not a:
            raise CotuneError(f"empty answer in row {row!r}")
        return p, [IGNORE] * len(p), a

    def overlong(self, rows: list[dict]) -> int:
        """How many of ``rows`` are longer than ``max_length`` tokens (``encode`` cuts them)."""
        return sum(len(p) + len(a) > self.max_length for p, _, a in map(self.encode_full, rows))

    def prompt_ids(self, row: dict) -> list[int]:
        prompt = self._chat_prompt(row["messages"]) if row.get("messages") else self.render(row)[0]
        p = self._ids(prompt)
        room = max(1, self.max_length - self.max_new_tokens)
        return p[-room:]

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
        if not rows:
            raise CotuneError("collate of an empty batch")
        self._ensure_pad(self.tokenizer)
        enc = [self.encode(r) for r in rows]
        T = max(len(i) for i, _ in enc)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        lab = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        att = torch.zeros((len(rows), T), dtype=torch.long)
        for b, (i, lb) in enumerate(enc):
            ids[b, : len(i)] = torch.tensor(i)
            lab[b, : len(lb)] = torch.tensor(lb)
            att[b, : len(i)] = 1
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    # ---- loss and evaluation

    @staticmethod
    def token_nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL over answer tokens, number of answer tokens): next-token prediction, labels shifted."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return next_token_nll(logits_of(out), batch["labels"])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's answer tokens."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return next_token_loss(logits_of(out), batch["labels"])

    def generate(self, model: nn.Module, rows: list[dict], batch_size: int = 8) -> list[str]:
        """Greedy completions of the rows' prompts (the new text only, special tokens dropped)."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        self._ensure_pad(tok)
        dev = model_device(model)
        cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=sorted(stop_token_ids(model, tok)) or None)
        texts: list[str] = []
        with eval_mode(model):
            for chunk in batches(rows, batch_size, desc="generate"):
                ids, att = left_pad([self.prompt_ids(r) for r in chunk], tok.pad_token_id)
                out = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), generation_config=cfg)
                texts += [t.strip() for t in tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
        return texts

    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int = 32, limit: int | None = None):
        """``loss``/``perplexity`` over the answer tokens, plus ``rouge_l`` or ``exact_match`` by greedy generation."""
        rows = rows[:limit] if limit is not None else rows
        if not rows:
            raise CotuneError("evaluate needs at least one row")
        dev = model_device(model)
        nll_sum, n_tok = 0.0, 0
        # The loss pass holds (rows, length, vocab) logits three times over (logits, shifted copy, log-softmax):
        # 32 rows x 256 tokens of a 49k vocabulary is 5 GB, so it runs 8 rows at a time (the sums are the same).
        with eval_mode(model):
            for chunk in batches(rows, max(1, min(batch_size, 8)), desc="eval"):
                nll, n = self.token_nll(model, to_device(self.collate(chunk), dev))
                nll_sum += nll.item()
                n_tok += int(n.item())
        out = {"loss": nll_sum / max(n_tok, 1)}
        out["perplexity"] = M.perplexity(out["loss"])
        if self.metric in ("rouge_l", "exact_match"):
            # A CPU's cost is the tokens computed, so 8 rows at a time waste little on rows that ended early; a
            # GPU's decode step costs about the same for 8 rows or 256, so there the caller's batch is the speed.
            gen_bs = batch_size if dev.type == "cuda" else max(1, min(batch_size, 8))
            if self.metric == "exact_match":
                preds = self.generate(model, rows, gen_bs)
                out["exact_match"] = M.exact_match(preds, [r.get("final") or r["answer"] for r in rows])
            else:
                groups: dict[str, tuple[dict, list[str]]] = {}
                for r in rows:  # one generation per distinct input, scored against all its references
                    key = json.dumps(r["messages"][:-1]) if r.get("messages") else r["prompt"]
                    groups.setdefault(key, (r, []))[1].append(r["answer"])
                preds = self.generate(model, [first for first, _ in groups.values()], gen_bs)
                out["rouge_l"] = M.rouge_l(preds, [refs for _, refs in groups.values()])
        return self.check_metrics(out)


def prompt_ids(tok: Any, text: str) -> list[int]:
    """Token ids of a prompt: the tokenizer's begin token added unless the text (a chat template) has it, and
    never an end token that a tokenizer appends by default (the prompt must not end the sequence)."""
    bos = tok.bos_token
    add = not (bos and text.startswith(bos))
    ids = tok(text, add_special_tokens=add)["input_ids"]
    if add and ids and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id and not text.endswith(
        tok.eos_token or "\0"
    ):
        ids = ids[:-1]
    return list(ids)


def stop_token_ids(model: nn.Module, tok: Any) -> set[int]:
    """The tokens that end an answer: the tokenizer's end token and the model's generation-config ones."""
    eos = {tok.eos_token_id} | _as_set(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    eos.discard(None)
    return eos


def _as_set(x: Any) -> set:
    if x is None:
        return set()
    return set(x) if isinstance(x, (list, tuple, set)) else {x}
