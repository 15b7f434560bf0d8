"""The HTTP API (FastAPI): tenants, uploads, jobs, metrics, adapter downloads and predictions.

Every resource is looked up *with* the caller's tenant id, so another tenant's job, file or adapter is
indistinguishable from one that does not exist (404). Uploads are stored under server-generated ids with a
size limit (413); the client's file name is kept only as a label.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import os
import re
import time
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from cotune.errors import CotuneError
from cotune.service.auth import check_admin, issue_token, verify_token
from cotune.service.config import ServiceConfig
from cotune.service.schemas import (
    FileInfo,
    JobInfo,
    JobSpec,
    Metric,
    PredictRequest,
    RegisterRequest,
    RegisterResponse,
)
from cotune.service.store import (
    ACTIVE_STATES,
    CANCELLED,
    FINAL_STATES,
    SUCCEEDED,
    FileRecord,
    JobRecord,
    Store,
    new_id,
)

#: Data formats the task loaders read; anything else is refused at upload time.
UPLOAD_EXTENSIONS = (".tsv", ".csv", ".json", ".jsonl", ".txt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_CHUNK = 1 << 16


def safe_label(filename: str) -> str:
    """The client's file name reduced to a harmless label: last path component, ``[A-Za-z0-9._-]`` only."""
    base = re.split(r"[\\/]", filename)[-1]
    label = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    return label or "upload"


def current_tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant id of the request's bearer token (401 when missing, malformed or wrong)."""
    token = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else None
    tid = verify_token(request.app.state.store, token)
    if tid is None:
        raise HTTPException(401, "missing or invalid token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    return tid


Tenant = Annotated[str, Depends(current_tenant)]


def create_app(config: ServiceConfig, store: Store | None = None, runner: Any = None) -> FastAPI:
    """The FastAPI app; starts ``runner`` (default: the training loop) with the app and stops it after."""
    store = store or Store(config.root)
    if runner is None:
        from cotune.service.runner import JobRunner

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

    @app.exception_handler(CotuneError)
    async def _cotune_error(request: Request, exc: CotuneError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and a NaN or Infinity in it (Python's json module reads those
        # tokens) cannot be serialised: the client got a 500 in plain text instead of this 422.
        return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})

    def own_job(job_id: str, tid: str) -> JobRecord:
        job = store.get_job(job_id, tid)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def own_file(file_id: str, tid: str) -> FileRecord:
        rec = store.get_file(file_id, tid)
        if rec is None:
            raise HTTPException(404, f"no file {file_id!r}")
        return rec

    # -- health and tenants ------------------------------------------------------------------------------
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness: the runner's state (no authentication)."""
        return {"ok": True, "model": config.model, "runner": runner.describe()}

    @app.post("/v1/tenants", response_model=RegisterResponse, status_code=201, tags=["tenants"])
    def register(body: RegisterRequest, x_admin_token: Annotated[str | None, Header()] = None) -> RegisterResponse:
        """Register a tenant; returns its token once (only its hash is stored)."""
        if not check_admin(config.admin_token, x_admin_token):
            raise HTTPException(403, "registration needs the server's admin token in 'X-Admin-Token'")
        tid, token = issue_token(store, body.name)
        return RegisterResponse(tenant_id=tid, token=token)

    @app.get("/v1/tenants/me", tags=["tenants"])
    def me(tid: Tenant) -> dict[str, Any]:
        t = store.tenant(tid) or {}
        return {"tenant_id": tid, "name": t.get("name"), "created": t.get("created")}

    # -- files ---------------------------------------------------------------------------------------------
    @app.post("/v1/files", response_model=FileInfo, status_code=201, tags=["files"])
    async def upload(
        request: Request, tid: Tenant, filename: Annotated[str, Query(min_length=1, max_length=255)]
    ) -> FileInfo:
        """Upload a data file as the raw request body (``curl --data-binary @train.tsv``)."""
        label = safe_label(filename)
        ext = os.path.splitext(label)[1].lower()
        if ext not in UPLOAD_EXTENSIONS:
            raise HTTPException(400, f"file type {ext or '(none)'!r} not accepted; upload one of {UPLOAD_EXTENSIONS}")
        limit = config.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"upload of {declared} bytes exceeds the server's limit of {limit} bytes")
        fid = new_id()
        path = store.file_path(fid, ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        size, digest = 0, hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:  # a body without (or lying about) Content-Length is cut off here
                        raise HTTPException(413, f"upload exceeds the server's limit of {limit} bytes")
                    digest.update(chunk)
                    f.write(chunk)
            if size == 0:
                raise HTTPException(400, "empty upload: send the file's bytes as the request body")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass
            raise
        rec = FileRecord(fid, tid, label, ext, size, digest.hexdigest(), time.time())
        store.add_file(rec)
        return FileInfo(**rec.public())

    @app.get("/v1/files", response_model=list[FileInfo], tags=["files"])
    def list_files(tid: Tenant) -> list[FileInfo]:
        return [FileInfo(**r.public()) for r in store.list_files(tid)]

    @app.get("/v1/files/{file_id}", response_model=FileInfo, tags=["files"])
    def get_file(file_id: str, tid: Tenant) -> FileInfo:
        return FileInfo(**own_file(file_id, tid).public())

    @app.get("/v1/files/{file_id}/content", tags=["files"])
    def file_content(file_id: str, tid: Tenant) -> FileResponse:
        rec = own_file(file_id, tid)
        return FileResponse(store.file_path(rec.id, rec.ext), filename=rec.filename,
                            media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", status_code=204, tags=["files"])
    def delete_file(file_id: str, tid: Tenant) -> Response:
        rec = own_file(file_id, tid)
        busy = [j.id for j in store.list_jobs(tid, ACTIVE_STATES) if _uses_file(j.spec, rec.id)]
        if busy:
            raise HTTPException(409, f"file {file_id} is used by active job(s) {busy}; cancel them first")
        store.delete_file(rec)
        return Response(status_code=204)

    # -- jobs ------------------------------------------------------------------------------------------------
    def check_data(ref: dict[str, Any] | None, tid: str, field: str) -> None:
        if ref is None:
            return
        if ref.get("file_id"):
            own_file(ref["file_id"], tid)
        elif ref.get("path"):
            p = Path(ref["path"]).expanduser().resolve()  # resolve first: ``..`` and symlinks cannot escape
            if not any(p.is_relative_to(r) for r in config.data_roots):
                roots = [str(r) for r in config.data_roots] or "none configured (cotune serve --data-root DIR)"
                raise HTTPException(403, f"{field}.path {ref['path']!r} is outside the server's data roots: {roots}")
            if not p.exists():
                raise HTTPException(400, f"{field}.path {ref['path']!r} does not exist on the server")
        elif ref.get("hub") and not config.allow_hub:
            raise HTTPException(403, f"{field}.hub: this server does not load hub data sets (cotune serve --allow-hub)")

    @app.post("/v1/jobs", response_model=JobInfo, status_code=201, tags=["jobs"])
    def submit(spec: JobSpec, tid: Tenant) -> JobInfo:
        """Submit a training job; it trains together with every other tenant's jobs on the shared base."""
        check_data(spec.train.model_dump(), tid, "train")
        check_data(spec.eval.model_dump() if spec.eval else None, tid, "eval")
        if spec.steps > config.max_steps:
            raise HTTPException(400, f"steps={spec.steps} exceeds the server's limit of {config.max_steps}")
        if spec.batch_size > config.max_batch_size:
            raise HTTPException(400, f"batch_size={spec.batch_size} exceeds the limit of {config.max_batch_size}")
        if spec.max_length > config.max_length:
            raise HTTPException(400, f"max_length={spec.max_length} exceeds the limit of {config.max_length}")
        active = store.list_jobs(tid, ACTIVE_STATES)
        if len(active) >= config.max_active_jobs:
            raise HTTPException(429, f"{len(active)} active jobs: the limit per tenant is {config.max_active_jobs}")
        jid = new_id()
        store.add_job(jid, tid, spec.model_dump(), spec.steps)
        runner.notify()
        return JobInfo(**store.get_job(jid).public())  # type: ignore[union-attr]

    @app.get("/v1/jobs", response_model=list[JobInfo], tags=["jobs"])
    def list_jobs(tid: Tenant) -> list[JobInfo]:
        return [JobInfo(**j.public()) for j in store.list_jobs(tid)]

    @app.get("/v1/jobs/{job_id}", response_model=JobInfo, tags=["jobs"])
    def job_status(job_id: str, tid: Tenant) -> JobInfo:
        """Status, progress (step / total_steps), last checkpoint, error reason and final metrics."""
        return JobInfo(**own_job(job_id, tid).public())

    @app.get("/v1/jobs/{job_id}/metrics", response_model=list[Metric], tags=["jobs"])
    def job_metrics(
        job_id: str, tid: Tenant, since_step: int = -1, limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000
    ) -> list[Metric]:
        own_job(job_id, tid)
        return [Metric(**m) for m in store.metrics(job_id, since_step, limit)]

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobInfo, tags=["jobs"])
    def cancel(job_id: str, tid: Tenant) -> JobInfo:
        job = own_job(job_id, tid)
        if job.status in FINAL_STATES:
            raise HTTPException(409, f"job {job_id} already {job.status}")
        store.update_job(job_id, status=CANCELLED, finished=time.time())
        runner.notify()
        return JobInfo(**own_job(job_id, tid).public())

    def finished_adapter(job_id: str, tid: str) -> Path:
        job = own_job(job_id, tid)
        folder = store.adapter_dir(job.id)
        if job.status != SUCCEEDED or not all((folder / n).is_file() for n in ADAPTER_FILES):
            raise HTTPException(409, f"job {job_id} is {job.status}: the adapter is available once it succeeded")
        return folder

    @app.get("/v1/jobs/{job_id}/adapter", tags=["adapters"])
    def download_adapter(job_id: str, tid: Tenant) -> Response:
        """The trained adapter as a zip of ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT)."""
        folder = finished_adapter(job_id, tid)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for n in ADAPTER_FILES:
                z.write(folder / n, arcname=n)
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="adapter-{job_id}.zip"'})

    @app.get("/v1/jobs/{job_id}/adapter/{name}", tags=["adapters"])
    def download_adapter_file(job_id: str, name: str, tid: Tenant) -> FileResponse:
        if name not in ADAPTER_FILES:  # a fixed list: no path from the client reaches the file system
            raise HTTPException(404, f"no adapter file {name!r}; files: {ADAPTER_FILES}")
        return FileResponse(finished_adapter(job_id, tid) / name, filename=name)

    @app.post("/v1/jobs/{job_id}/predict", tags=["adapters"])
    async def predict(job_id: str, body: PredictRequest, tid: Tenant) -> dict[str, Any]:
        """Predictions with this job's adapter; concurrent requests of all tenants share one base pass."""
        job = await asyncio.to_thread(own_job, job_id, tid)
        if job.status not in (SUCCEEDED, "running"):
            raise HTTPException(409, f"job {job_id} is {job.status}: predictions need a running or finished job")
        if len(body.inputs) > config.max_predict_inputs:
            raise HTTPException(413, f"{len(body.inputs)} inputs; the limit is {config.max_predict_inputs}")
        if sum(len(x) for x in body.inputs) > config.max_predict_chars:
            raise HTTPException(413, f"inputs exceed {config.max_predict_chars} characters in total")
        fut = runner.submit_predict(job, body.inputs, body.max_new_tokens)
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=120)
        except CotuneError as e:
            raise HTTPException(400, str(e)) from e
        except TimeoutError as e:
            raise HTTPException(503, "prediction timed out; the server is overloaded") from e
        return {"job_id": job_id, "predictions": out}

    return app


def _uses_file(spec: dict[str, Any], file_id: str) -> bool:
    return any((spec.get(k) or {}).get("file_id") == file_id for k in ("train", "eval"))


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats written as strings ("nan", "inf"), so strict JSON can carry it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
