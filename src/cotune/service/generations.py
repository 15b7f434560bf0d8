"""Text generation for the OpenAI-compatible routes: every pending request of every tenant decoded together.

The HTTP side queues a ``GenerateRequest`` (a job's adapter or the base, a prompt or a chat, sampling settings)
with an ``emit`` callback; the runner's worker thread takes all pending requests at once, turns each into
prompt tokens (chat messages through the tokenizer's chat template, with the job's own system prompt when the
dialogue brings none) and decodes them in ONE batched loop (``cotune.tenants.generation.decode``), each row
through its own tenant's adapters. The request hears, in order: ``("start", prompt_tokens)``, then
``("text", delta)`` as text becomes final, then ``("done", result)``; or ``("error", CotuneError)`` at any point
before ``done``. A running job generates with the weights of its last completed step.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cotune.errors import CotuneError
from cotune.service.config import ServiceConfig
from cotune.service.pending import Pending
from cotune.service.store import JobRecord, Store

log = logging.getLogger("cotune.service")

Event = tuple[str, Any]


@dataclass
class GenerateRequest:
    """One completion to produce; exactly one of ``prompt`` (text) and ``messages`` (a chat) is set."""

    job: JobRecord | None  # None: the base model
    prompt: str | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    #: set by the HTTP side when the client went away: the row stops at its next token
    cancelled: threading.Event = field(default_factory=threading.Event)


class TextStream:
    """Token ids in, final text out: holds back what a stop string or an unfinished UTF-8 character may change."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the text so far, cut at a stop string once one is found
        self.sent = 0  # characters of ``text`` already emitted
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the new text that is final (``stopped`` tells whether a stop string ended it)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its last byte
            return ""
        cut = [k for k in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if k >= 0]
        if cut:
            self.text, self.stopped = text[: min(cut)], True
            return self.flush()
        self.text = text
        upto = max(self.sent, len(text) - self.hold)
        delta, self.sent = text[self.sent : upto], upto
        return delta

    def flush(self) -> str:
        """The rest of the text (at the end of the answer)."""
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


class Generations:
    """The queue of generation requests and the batched decode that answers them (worker thread only)."""

    def __init__(self, config: ServiceConfig, store: Store) -> None:
        self.config, self.store = config, store
        self._pending: Pending[GenerateRequest] = Pending()
        self.passes = 0
        #: ``service.jobs.Jobs`` on the loaded base, set by the runner (requests queue up until then)
        self.jobs: Any = None

    def put(self, req: GenerateRequest) -> None:
        self._pending.put(req)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def fail_pending(self, reason: str = "the service is shutting down") -> None:
        for r in self._pending.take():
            r.emit(("error", CotuneError(reason)))

    def serve(self) -> None:
        """Decode every pending request together."""
        from cotune.tenants.generation import decode

        if not self._pending:
            return
        if self.config.predict_wait_s > 0:  # let concurrent requests of other tenants join this batch
            time.sleep(self.config.predict_wait_s)
        rows: list[tuple[GenerateRequest, Any, TextStream]] = []
        for r in self._pending.take():
            try:
                rows.append(self._prepare(r))
            except Exception as e:
                r.emit(("error", e if isinstance(e, CotuneError) else CotuneError(f"{type(e).__name__}: {e}")))
        if not rows:
            return
        for r, d, _ in rows:
            r.emit(("start", len(d.prompt)))
        tok = self.jobs.tokenizer
        try:
            decode(self.jobs.bank, [d for _, d, _ in rows], tok.pad_token_id or 0)
        except Exception as e:
            log.error("generation pass failed:\n%s", traceback.format_exc())
            err = e if isinstance(e, CotuneError) else CotuneError(f"generation failed: {type(e).__name__}: {e}")
            for r, _, _ in rows:
                r.emit(("error", err))
            return
        self.passes += 1
        for r, d, ts in rows:
            rest = ts.flush()
            if rest:
                r.emit(("text", rest))
            r.emit(("done", {"text": ts.text, "finish_reason": d.finish_reason or "stop",
                             "prompt_tokens": len(d.prompt), "completion_tokens": len(d.tokens)}))

    def _prepare(self, r: GenerateRequest) -> tuple[GenerateRequest, Any, TextStream]:
        """The request's decode row (``DecodeRequest``) and text stream; ``CotuneError`` on a bad request."""
        from cotune.tasks.causal_lm import prompt_ids, stop_token_ids
        from cotune.tenants.generation import DecodeRequest
        from cotune.tenants.routing import BASE

        jobs = self.jobs
        if jobs.model_task != "causal_lm":
            raise CotuneError(f"this server's base model ({self.config.model_id}) is an encoder: it classifies "
                              "(POST /v1/jobs/{id}/predict) and does not generate text")
        tok, system, key = jobs.tokenizer, None, BASE
        if r.job is not None:
            wl = jobs.workload_for(self.store.get_job(r.job.id) or r.job)
            if wl.predicts_labels:
                raise CotuneError(f"job {r.job.id} is a classification job: use POST /v1/jobs/{r.job.id}/predict")
            key, system = r.job.key, wl.system
        if r.messages is not None:
            if getattr(tok, "chat_template", None) is None:
                raise CotuneError("this base model's tokenizer has no chat template: use /v1/completions")
            msgs = r.messages
            if system and not any(m["role"] == "system" for m in msgs):
                msgs = [{"role": "system", "content": system}, *msgs]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = r.prompt or ""
        ids = prompt_ids(tok, text)
        if not ids:
            raise CotuneError("the prompt is empty")
        window = int(getattr(jobs.bank.model.config, "max_position_embeddings", 0) or 0)
        if window and len(ids) + r.max_tokens > window:
            raise CotuneError(f"the prompt has {len(ids)} tokens and max_tokens is {r.max_tokens}: together more "
                              f"than the model's context window of {window} tokens; shorten the prompt or lower "
                              "max_tokens")
        ts = TextStream(tok, r.stop)

        def on_token(token: int) -> bool:
            delta = ts.push(token)
            if delta:
                r.emit(("text", delta))
            return ts.stopped or r.cancelled.is_set()

        d = DecodeRequest(key, ids, r.max_tokens, frozenset(stop_token_ids(jobs.bank.model, tok)), r.temperature, r.top_p,
                 r.seed, on_token)
        return r, d, ts
