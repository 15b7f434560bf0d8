"""OpenAI-compatible generation: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

``model`` is one of the caller's jobs (a finished job's adapter, or a running job's weights after its last
step) or the base model's name; another tenant's job is not found, exactly like a missing one. Concurrent
requests of all tenants are decoded together by the runner (``cotune.service.generations``). Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients raise their usual
exceptions; ``stream: true`` answers with server-sent events, one chunk per text delta, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cotune.service.generations import GenerateRequest
from cotune.service.routes.deps import ConfigDep, RunnerDep, StoreDep, tenant_of
from cotune.service.schemas import ChatCompletionRequest, CompletionRequest
from cotune.service.store import RUNNING, SUCCEEDED, JobRecord, new_id

#: Seconds a request may wait for its next event (its turn behind a training round, then each token).
GENERATE_TIMEOUT_S = 600
#: The routes whose errors (validation included) are written in OpenAI's shape.
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/fine_tuning")
#: Tokens an answer may have when the request does not say (``max_tokens``), within the server's limit.
DEFAULT_MAX_TOKENS = 256

router = APIRouter(tags=["generation (OpenAI-compatible)"])


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type_, "param": param, "code": code}
        self.headers = headers

    @classmethod
    def of(cls, e: HTTPException, param: str | None = None) -> OpenAIError:
        """A native route's refusal told in OpenAI's shape, its headers (``Retry-After``) kept."""
        return cls(e.status_code, str(e.detail), type_="rate_limit_exceeded" if e.status_code == 429 else
                   "invalid_request_error", param=param, headers=dict(e.headers) if e.headers else None)


async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.body}, headers=exc.headers)


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page of ``items`` (each with an ``id``): the ``limit`` after the id ``after``."""
    if after is not None:
        ids = [it["id"] for it in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def openai_tenant(request: Request, store: StoreDep, authorization: Annotated[str | None, Header()] = None) -> str:
    tid = tenant_of(store, authorization)
    if tid is None:
        raise OpenAIError(401, "missing or invalid API key: send your cotune token as the API key "
                               "('Authorization: Bearer <token>')", code="invalid_api_key")
    refused = request.app.state.limiter.refusal(tid)
    if refused:
        raise OpenAIError(429, refused[0], type_="rate_limit_exceeded", headers=refused[1])
    return tid


OpenAITenant = Annotated[str, Depends(openai_tenant)]


def _model(model_id: str, created: float, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owner}


@router.get("/v1/models")
def list_models(tid: OpenAITenant, store: StoreDep, config: ConfigDep) -> dict[str, Any]:
    """The base model and the caller's jobs that can generate (running or succeeded)."""
    jobs = store.list_jobs(tid, statuses=(RUNNING, SUCCEEDED))
    return {"object": "list", "data": [_model(config.model_id, 0, "cotune")]
            + [_model(j.id, j.created, tid) for j in jobs]}


@router.get("/v1/models/{model}")
def get_model(model: str, tid: OpenAITenant, store: StoreDep, config: ConfigDep) -> dict[str, Any]:
    job = _resolve(model, tid, store, config.model_id)
    return _model(config.model_id, 0, "cotune") if job is None else _model(job.id, job.created, tid)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, tid: OpenAITenant, store: StoreDep, config: ConfigDep,
                           runner: RunnerDep) -> JSONResponse | StreamingResponse:
    """A chat answer from ``model`` (a job's adapter or the base), through the tokenizer's chat template."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    return await _complete("chat", body, body.max_completion_tokens or body.max_tokens, None, messages, tid, store,
                           config, runner)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, tid: OpenAITenant, store: StoreDep, config: ConfigDep,
                      runner: RunnerDep) -> JSONResponse | StreamingResponse:
    """A text completion of ``prompt`` from ``model`` (a job's adapter or the base)."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise OpenAIError(400, "prompt: one prompt per request (a list of one is accepted)", param="prompt")
        prompt = prompt[0]
    return await _complete("text", body, body.max_tokens, prompt, None, tid, store, config, runner)


def _resolve(model: str, tid: str, store: Any, base_id: str) -> JobRecord | None:
    """The caller's job named ``model`` (``None``: the base model); 404 for anything else."""
    if model == base_id:
        return None
    job = store.get_job(model, tid)
    if job is None:
        raise OpenAIError(404, f"The model '{model}' does not exist or you do not have access to it; "
                               "GET /v1/models lists yours", param="model", code="model_not_found")
    if job.status not in (RUNNING, SUCCEEDED):
        raise OpenAIError(400, f"job {model} is {job.status}: only running or succeeded jobs generate",
                          param="model", code="model_not_ready")
    return job


async def _complete(kind: str, body: Any, max_tokens: int | None, prompt: str | None, messages: list | None,
                    tid: str, store: Any, config: Any, runner: Any) -> JSONResponse | StreamingResponse:
    job = await asyncio.to_thread(_resolve, body.model, tid, store, config.model_id)
    max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, config.max_new_tokens)
    if max_tokens > config.max_new_tokens:
        raise OpenAIError(400, f"max_tokens {max_tokens} is over this server's limit of {config.max_new_tokens}",
                          param="max_tokens")
    try:
        stop = body.stops()
    except ValueError as e:
        raise OpenAIError(400, str(e), param="stop") from e
    chars = len(prompt or "") + sum(len(m["content"]) for m in messages or [])
    if chars > config.max_predict_chars:
        raise OpenAIError(400, f"the prompt has {chars} characters; this server's limit is {config.max_predict_chars}",
                          param="messages" if messages is not None else "prompt")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    req = GenerateRequest(job, prompt, messages, max_tokens, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                          body.temperature, body.top_p, stop, body.seed)
    runner.submit_generate(req)
    first = await _next(events, req)
    if first[0] == "error":
        raise OpenAIError(400, str(first[1]))
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + new_id()
    head = {"id": ident, "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(_stream(kind, head, events, req), media_type="text/event-stream")
    parts: list[str] = []
    while True:
        ev, value = await _next(events, req)
        if ev == "text":
            parts.append(value)
        elif ev == "error":
            raise OpenAIError(500, str(value), type_="server_error")
        else:
            break
    usage = {"prompt_tokens": value["prompt_tokens"], "completion_tokens": value["completion_tokens"],
             "total_tokens": value["prompt_tokens"] + value["completion_tokens"]}
    text, reason = "".join(parts), value["finish_reason"]
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})
    choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": usage})


async def _next(events: asyncio.Queue, req: GenerateRequest) -> tuple[str, Any]:
    try:
        return await asyncio.wait_for(events.get(), timeout=GENERATE_TIMEOUT_S)
    except TimeoutError as e:
        req.cancelled.set()
        raise OpenAIError(503, "generation timed out; the server is overloaded", type_="server_error") from e


async def _stream(kind: str, head: dict[str, Any], events: asyncio.Queue, req: GenerateRequest) -> AsyncIterator[str]:
    """OpenAI's server-sent events: a chunk per text delta, a last chunk with the finish reason, ``[DONE]``."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, reason: str | None = None, role: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"

    try:
        if kind == "chat":
            yield chunk(None, role=True)
        while True:
            try:
                ev, value = await _next(events, req)
            except OpenAIError as e:
                yield f"data: {json.dumps({'error': e.body})}\n\n"
                return
            if ev == "text":
                yield chunk(value)
            elif ev == "error":
                yield f"data: {json.dumps({'error': OpenAIError(500, str(value), 'server_error').body})}\n\n"
                return
            else:
                yield chunk(None, value["finish_reason"])
                yield "data: [DONE]\n\n"
                return
    finally:
        req.cancelled.set()  # a client that went away stops its row at the next token
