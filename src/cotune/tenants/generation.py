"""Batched decoding for many tenants at once: one KV cache, each row through its own tenant's adapters.

``decode(bank, requests, pad_id)`` left-pads the prompts into one batch and runs ONE prefill, then one forward
per new token for every row still decoding, inside ``bank.route`` (the router gives each row its own tenant's
adapters; rows of ``BASE`` get the frozen base model), with a transformers ``DynamicCache``. Each row samples
with its own settings (greedy at temperature 0, else temperature and nucleus ``top_p`` from its own seeded
generator) and stops at its own stop tokens, at ``max_new_tokens``, or when its ``on_token`` callback says so
(stop strings). Finished rows leave the batch and their cache rows are dropped, so each step costs what the
rows still decoding need.

Positions follow the attention mask exactly as Hugging Face ``generate`` computes them for left padding, so a
row's greedy tokens equal its tokens decoded alone and those of ``generate`` with the adapter loaded by PEFT
(both tested). Written here rather than calling ``generate`` because ``generate`` applies one sampling setting
and one stopping rule to the whole batch and cannot change the batch's rows between steps.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cotune.errors import CotuneError
from cotune.tasks.base import left_pad
from cotune.tenants.bank import TenantBank
from cotune.tenants.routing import RowGroups


@dataclass
class DecodeRequest:
    """One row to decode; ``tokens`` and ``finish_reason`` are filled in by ``decode``.

    ``tenant``: a tenant of the bank, or ``BASE`` for the frozen base model. ``on_token(token)`` is called with
    each new token (stop tokens excluded); returning ``True`` ends the row with ``finish_reason="stop"``.
    """

    tenant: str
    prompt: Sequence[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    on_token: Callable[[int], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token or string) or "length"

    def check(self) -> None:
        if not self.prompt:
            raise CotuneError("the prompt has no tokens")
        if self.max_new_tokens < 1:
            raise CotuneError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise CotuneError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")


def decode(bank: TenantBank, requests: Sequence[DecodeRequest], pad_id: int) -> None:
    """Decode every request together (see the module docstring); fills each one's ``tokens`` / ``finish_reason``."""
    if not requests:
        return
    for r in requests:
        r.check()
    model = bank.model
    dev = next(model.parameters()).device
    ids, mask = left_pad([list(r.prompt) for r in requests], pad_id)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what ``generate`` computes for left padding
    gens = [torch.Generator().manual_seed(r.seed if r.seed is not None else random.getrandbits(63)) for r in requests]
    from transformers import DynamicCache

    cache = DynamicCache()
    params = inspect.signature(model.forward).parameters
    extra: dict = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no (n, T, vocab) prefill logits
    extra["cache" if "cache" in params else "past_key_values"] = cache  # transformers >= 5.24 renamed it
    live = list(range(len(requests)))  # the requests whose rows are in the batch, in row order
    inputs, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
    with torch.inference_mode(), bank.route([requests[i].tenant for i in live]) as router:
        while live:
            out = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
            logits = out.logits[:, -1].float()
            keep, nxt = [], []
            for row, i in enumerate(live):
                r = requests[i]
                tok = _sample(logits[row], r, gens[i])
                if tok in r.stop_ids:
                    r.finish_reason = "stop"
                    continue
                r.tokens.append(tok)
                if r.on_token is not None and r.on_token(tok):
                    r.finish_reason = "stop"
                elif len(r.tokens) >= r.max_new_tokens:
                    r.finish_reason = "length"
                else:
                    keep.append(row)
                    nxt.append(tok)
            if len(keep) < len(live):
                if not keep:
                    break
                rows = torch.tensor(keep, device=dev)
                cache.batch_select_indices(rows)
                mask, positions = mask[rows], positions[rows]
                live = [live[k] for k in keep]
                router.groups = RowGroups.from_ids([requests[i].tenant for i in live])
            inputs = torch.tensor(nxt, dtype=torch.long, device=dev).unsqueeze(1)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            positions = positions[:, -1:] + 1


def _sample(logits: torch.Tensor, r: DecodeRequest, gen: torch.Generator) -> int:
    """The next token of one row: argmax at temperature 0, else a draw from its tempered nucleus."""
    if r.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / r.temperature, -1)
    if r.top_p < 1:
        p, idx = probs.sort(descending=True)
        p[(p.cumsum(0) - p) >= r.top_p] = 0  # keep the smallest head whose mass reaches top_p
        return int(idx[torch.multinomial(p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))
