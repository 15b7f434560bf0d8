"""What the routes depend on: the app's store, config and job runner, and the tenant of the request's token.

``create_app`` puts the store, config and runner on ``app.state``; a route asks for them by annotating a
parameter with ``StoreDep``, ``ConfigDep``, ``RunnerDep`` or ``Tenant``. ``own_job`` / ``own_file`` look a
resource up *with* the caller's tenant id, so another tenant's is indistinguishable from a missing one (404).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request

from cotune.service.auth import verify_token
from cotune.service.config import ServiceConfig
from cotune.service.store import FileRecord, JobRecord, Store


# The three accessors are ``async`` only because they read an attribute: FastAPI then calls them in the event
# loop instead of handing each to a worker thread.
async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_config(request: Request) -> ServiceConfig:
    return request.app.state.config


async def get_runner(request: Request) -> Any:
    """The job runner (``cotune.service.runner.JobRunner``, or a test's stand-in)."""
    return request.app.state.runner


StoreDep = Annotated[Store, Depends(get_store)]
ConfigDep = Annotated[ServiceConfig, Depends(get_config)]
RunnerDep = Annotated[Any, Depends(get_runner)]


def tenant_of(store: Store, authorization: str | None) -> str | None:
    """The tenant id of an ``Authorization: Bearer <token>`` header (``None``: missing, malformed or wrong)."""
    token = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else None
    return verify_token(store, token)


class RateLimiter:
    """A token bucket per tenant: ``rate`` requests per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, time)
        self._lock = threading.Lock()

    def refusal(self, tenant: str) -> tuple[str, dict[str, str]] | None:
        """``None`` when the tenant's request may go now (it is counted), else the 429's message and headers."""
        wait = self.wait(tenant)
        if not wait:
            return None
        return (f"too many requests: this server allows {self.rate:g} per second per tenant",
                {"Retry-After": str(math.ceil(wait))})

    def wait(self, tenant: str) -> float:
        """0 when the request may go now (and counts it), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            tokens, then = self._buckets.get(tenant, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / self.rate


def current_tenant(request: Request, store: StoreDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant id of the request's bearer token (401 when missing, malformed or wrong; 429 over the rate)."""
    tid = tenant_of(store, authorization)
    if tid is None:
        raise HTTPException(401, "missing or invalid token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    refused = request.app.state.limiter.refusal(tid)
    if refused:
        raise HTTPException(429, refused[0], headers=refused[1])
    return tid


Tenant = Annotated[str, Depends(current_tenant)]


def own_job(store: Store, job_id: str, tid: str) -> JobRecord:
    """Job ``job_id`` of tenant ``tid`` (404 when it does not exist or is another tenant's)."""
    job = store.get_job(job_id, tid)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def own_file(store: Store, file_id: str, tid: str) -> FileRecord:
    """Uploaded file ``file_id`` of tenant ``tid`` (404 when it does not exist or is another tenant's)."""
    rec = store.get_file(file_id, tid)
    if rec is None:
        raise HTTPException(404, f"no file {file_id!r}")
    return rec
