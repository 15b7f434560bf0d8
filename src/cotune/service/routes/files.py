"""``/v1/files``: upload a data file as the raw request body, list, read back and delete the caller's files.

Uploads are stored under server-generated ids with a size limit (413); the client's file name is kept only as a
label (``safe_label``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response

from cotune.service.routes.deps import ConfigDep, StoreDep, Tenant, own_file
from cotune.service.schemas import FileInfo
from cotune.service.store import ACTIVE_STATES, FileRecord, new_id

#: Data formats the task loaders read; anything else is refused at upload time.
UPLOAD_EXTENSIONS = (".tsv", ".csv", ".json", ".jsonl", ".txt")

router = APIRouter(tags=["files"])


def safe_label(filename: str) -> str:
    """The client's file name reduced to a harmless label: last path component, ``[A-Za-z0-9._-]`` only."""
    base = re.split(r"[\\/]", filename)[-1]
    label = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    return label or "upload"


@router.post("/v1/files", response_model=FileInfo, status_code=201)
async def upload(
    request: Request,
    tid: Tenant,
    filename: Annotated[str, Query(min_length=1, max_length=255)],
    store: StoreDep,
    config: ConfigDep,
) -> FileInfo:
    """Upload a data file as the raw request body (``curl --data-binary @train.tsv``)."""
    label = safe_label(filename)
    ext = os.path.splitext(label)[1].lower()
    if ext not in UPLOAD_EXTENSIONS:
        raise HTTPException(400, f"file type {ext or '(none)'!r} not accepted; upload one of {UPLOAD_EXTENSIONS}")
    room = config.tenant_storage_bytes - await asyncio.to_thread(store.usage, tid)
    if room <= 0:
        raise HTTPException(413, f"your storage quota of {config.tenant_storage_bytes} bytes is used up: delete "
                                 "files (DELETE /v1/files/{id}) or adapters (DELETE /v1/jobs/{id}/adapter)")
    limit = min(config.max_upload_bytes, room)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload of {declared} bytes exceeds the server's limit of {limit} bytes "
                                 "(the upload limit, or what is left of your storage quota)")
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


@router.get("/v1/files", response_model=list[FileInfo])
def list_files(tid: Tenant, store: StoreDep) -> list[FileInfo]:
    return [FileInfo(**r.public()) for r in store.list_files(tid)]


@router.get("/v1/files/{file_id}", response_model=FileInfo)
def get_file(file_id: str, tid: Tenant, store: StoreDep) -> FileInfo:
    return FileInfo(**own_file(store, file_id, tid).public())


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, tid: Tenant, store: StoreDep) -> FileResponse:
    rec = own_file(store, file_id, tid)
    return FileResponse(store.file_path(rec.id, rec.ext), filename=rec.filename, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", status_code=204)
def delete_file(file_id: str, tid: Tenant, store: StoreDep) -> Response:
    rec = own_file(store, file_id, tid)
    busy = [j.id for j in store.list_jobs(tid, ACTIVE_STATES) if _uses_file(j.spec, rec.id)]
    if busy:
        raise HTTPException(409, f"file {file_id} is used by active job(s) {busy}; cancel them first")
    store.delete_file(rec)
    return Response(status_code=204)


def _uses_file(spec: dict[str, Any], file_id: str) -> bool:
    return any((spec.get(k) or {}).get("file_id") == file_id for k in ("train", "eval"))
