"""What the routes depend on: the app's store, config and job runner, and the tenant of the request's token.

``create_app`` puts the store, config and runner on ``app.state``; a route asks for them by annotating a
parameter with ``StoreDep``, ``ConfigDep``, ``RunnerDep`` or ``Tenant``. ``own_job`` / ``own_file`` look a
resource up *with* the caller's tenant id, so another tenant's is indistinguishable from a missing one (404).
"""

from __future__ import annotations

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


def current_tenant(store: StoreDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant id of the request's bearer token (401 when missing, malformed or wrong)."""
    tid = tenant_of(store, authorization)
    if tid is None:
        raise HTTPException(401, "missing or invalid token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
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
