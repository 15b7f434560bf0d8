"""The HTTP API (FastAPI): tenants, uploads, jobs, metrics, adapter downloads, predictions and OpenAI-compatible
generation.

Every resource is looked up *with* the caller's tenant id, so another tenant's job, file or adapter is
indistinguishable from one that does not exist (404). Uploads are stored under server-generated ids with a
size limit (413); the client's file name is kept only as a label.

``create_app`` builds the app from the routers of :mod:`cotune.service.routes` (one module per resource) and
puts the store, config and job runner on ``app.state``, where the routes' dependencies read them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cotune.errors import CotuneError
from cotune.service.config import ServiceConfig
from cotune.service.routes import adapters, files, fine_tuning, health, jobs, openai, predict, tenants, worker
from cotune.service.routes.deps import RateLimiter
from cotune.service.routes.files import safe_label
from cotune.service.store import Store

__all__ = ["create_app", "safe_label"]

#: Included in this order (the order of the OpenAPI document).
ROUTERS = (health.router, tenants.router, files.router, jobs.router, worker.router, adapters.router, predict.router,
           openai.router, fine_tuning.router)


def create_app(config: ServiceConfig, store: Store | None = None, runner: Any = None) -> FastAPI:
    """The FastAPI app; starts ``runner`` with the app and stops it after.

    The default runner trains in a child process (``trainer_process.ProcessRunner``), or in a thread of this
    one with ``config.trainer == "thread"`` (``runner.JobRunner``).
    """
    store = store or Store(config.root)
    if runner is None and config.trainer == "process":
        from cotune.service.trainer_process import ProcessRunner

        runner = ProcessRunner(config, store)
    elif runner is None:
        from cotune.service.runner import JobRunner  # late: the training stack, unneeded with a given runner

        runner = JobRunner(config, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.stop)

    app = FastAPI(
        title="cotune fine-tuning service",
        version="1",
        description="Many tenants fine-tune adapters on one shared base model. Authenticate with "
        "'Authorization: Bearer <token>' from POST /v1/tenants.",
        lifespan=lifespan,
    )
    app.state.store, app.state.runner, app.state.config = store, runner, config
    app.state.limiter = RateLimiter(config.rate_limit, max(1.0, 2 * config.rate_limit))
    app.add_exception_handler(CotuneError, _cotune_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(openai.OpenAIError, openai.openai_error)  # type: ignore[arg-type]
    for router in ROUTERS:
        app.include_router(router)
    return app


async def _cotune_error(request: Request, exc: CotuneError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": str(exc)})


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input, and a NaN or Infinity in it (Python's json module reads those
    # tokens) cannot be serialised: the client got a 500 in plain text instead of this 422.
    errors = _json_safe(jsonable_encoder(exc.errors()))
    if request.url.path.startswith(openai.PATHS):  # OpenAI answers a bad parameter with a 400 in its own shape
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in errors)
        return JSONResponse(status_code=400, content={"error": {"message": message, "type": "invalid_request_error",
                                                                "param": where, "code": None}})
    return JSONResponse(status_code=422, content={"detail": errors})


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats written as strings ("nan", "inf"), so strict JSON can carry it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
