"""``/v1/files``: upload a data file, list, read back and delete the caller's files.

An upload is the raw request body with ``?filename=`` (``curl --data-binary @train.tsv``, ``cotune client``), or
OpenAI's multipart form (``file`` and ``purpose="fine-tune"``) as the ``openai`` client's ``files.create`` sends
it. Uploads are stored under server-generated ids with a size limit (413); the client's file name is kept only as a
label (``safe_label``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from cotune.service.config import ServiceConfig
from cotune.service.routes.deps import ConfigDep, StoreDep, Tenant, own_file
from cotune.service.routes.openai import OpenAIError, page
from cotune.service.schemas import FileInfo, FileList
from cotune.service.store import ACTIVE_STATES, PURPOSE, FileRecord, Store, new_id

#: Data formats the task loaders read; anything else is refused at upload time.
UPLOAD_EXTENSIONS = (".tsv", ".csv", ".json", ".jsonl", ".txt")
#: Bytes a multipart body may carry besides its file: the boundaries, part headers and the ``purpose`` field.
FORM_OVERHEAD = 64 * 2**10

router = APIRouter(tags=["files"])


def safe_label(filename: str) -> str:
    """The client's file name reduced to a harmless label: last path component, ``[A-Za-z0-9._-]`` only."""
    base = re.split(r"[\\/]", filename)[-1]
    label = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    return label or "upload"


def _extension(label: str) -> str:
    ext = os.path.splitext(label)[1].lower()
    if ext not in UPLOAD_EXTENSIONS:
        raise HTTPException(400, f"file type {ext or '(none)'!r} not accepted; upload one of {UPLOAD_EXTENSIONS}")
    return ext


class _Sink:
    """The uploaded file's bytes on their way to disk: counted against ``limit``, hashed, written."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out, self.limit, self.size, self.digest = out, limit, 0, hashlib.sha256()

    def take(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:  # a body without (or lying about) Content-Length is cut off here
            raise HTTPException(413, f"upload exceeds the server's limit of {self.limit} bytes")
        self.digest.update(data)
        self.out.write(data)


class _Form:
    """OpenAI's multipart upload, parsed as it streams in: the ``file`` part goes through a :class:`_Sink` and the
    other fields are kept (small). By hand around python-multipart's parser because starlette's
    ``request.form()`` spools a file part of any size to disk before a route could refuse it."""

    def __init__(self, boundary: bytes, sink: _Sink) -> None:
        self.sink = sink
        self.filename: str | None = None
        self.fields: dict[str, bytes] = {}
        self._headers: dict[bytes, bytes] = {}
        self._header, self._value = b"", b""
        self._part: str | None = None
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._on_field, "on_header_value": self._on_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done, "on_part_data": self._data,
        })

    def _begin(self) -> None:
        self._headers, self._part = {}, None

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header, self._value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part = options.get(b"name", b"").decode("utf-8", "replace")
        if self._part == "file":
            if self.filename is not None:
                raise HTTPException(400, "one file per upload: the form has two 'file' parts")
            self.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
            _extension(safe_label(self.filename))  # refused before its bytes are read
        elif self._part in self.fields:
            raise HTTPException(400, f"the form field {self._part!r} is given twice")
        else:
            self.fields[self._part] = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.sink.take(data[start:end])
            return
        self.fields[self._part or ""] += data[start:end]
        if len(self.fields[self._part or ""]) > 1024:
            raise HTTPException(400, f"the form field {self._part!r} is over 1 KiB: only 'file' carries data")

    def finish(self) -> str:
        """The upload's file name, once the whole body is in; 400 for a form that is not OpenAI's upload."""
        self.parser.finalize()
        if self.filename is None:
            raise HTTPException(400, "the form has no 'file' part: send the data as the part named 'file'")
        purpose = self.fields.get("purpose", b"").decode("utf-8", "replace")
        if purpose != PURPOSE:
            raise HTTPException(400, f"purpose {purpose or '(none)'!r}: files here are training data; send "
                                     f"purpose={PURPOSE!r}")
        return self.filename


@router.post("/v1/files", response_model=FileInfo, status_code=201)
async def upload(
    request: Request,
    tid: Tenant,
    store: StoreDep,
    config: ConfigDep,
    filename: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
) -> FileInfo:
    """Upload a data file: the raw request body with ``?filename=`` (``curl --data-binary @train.tsv``), or OpenAI's
    multipart form (``file``, ``purpose="fine-tune"``), as ``client.files.create`` sends it."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    form = kind == b"multipart/form-data"
    try:
        rec = await _receive(request, tid, store, config, options.get(b"boundary", b"") if form else None,
                              filename)
    except HTTPException as e:
        if not form:
            raise
        # an OpenAI client reads errors in OpenAI's shape only
        raise OpenAIError.of(e, param="purpose" if "purpose" in str(e.detail) else "file") from e
    store.add_file(rec)
    return FileInfo(**rec.public())


async def _receive(request: Request, tid: str, store: Store, config: ServiceConfig, boundary: bytes | None,
                   filename: str | None) -> FileRecord:
    """The upload on disk under a new id (``boundary``: OpenAI's multipart form, else the raw body)."""
    form = boundary is not None
    if form and not boundary:
        raise HTTPException(400, "a multipart upload needs the boundary in its Content-Type header")
    if not form:
        if not filename:
            raise HTTPException(400, "name the file: POST /v1/files?filename=train.tsv with its bytes as the body, "
                                     "or send OpenAI's multipart form (file, purpose)")
        _extension(safe_label(filename))
    room = config.tenant_storage_bytes - await asyncio.to_thread(store.usage, tid)
    if room <= 0:
        raise HTTPException(413, f"your storage quota of {config.tenant_storage_bytes} bytes is used up: delete "
                                 "files (DELETE /v1/files/{id}) or adapters (DELETE /v1/jobs/{id}/adapter)")
    limit = min(config.max_upload_bytes, room)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + (FORM_OVERHEAD if form else 0):
        raise HTTPException(413, f"upload of {declared} bytes exceeds the server's limit of {limit} bytes "
                                 "(the upload limit, or what is left of your storage quota)")
    fid = new_id()
    folder = store.file_path(fid, "").parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".upload.tmp"
    received = 0
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(f, limit)
            parts = _Form(boundary, sink) if boundary else None
            async for chunk in request.stream():
                if parts is None:
                    sink.take(chunk)
                    continue
                received += len(chunk)
                if received > limit + FORM_OVERHEAD:
                    raise HTTPException(413, f"upload exceeds the server's limit of {limit} bytes")
                parts.parser.write(chunk)
            label = safe_label(parts.finish() if parts else filename or "")
        if sink.size == 0:
            raise HTTPException(400, "empty upload: send the file's bytes as the request body (or the 'file' part)")
        ext = _extension(label)
        os.replace(tmp, store.file_path(fid, ext))
    except BaseException:
        tmp.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass
        raise
    return FileRecord(fid, tid, label, ext, sink.size, sink.digest.hexdigest(), time.time())


@router.get("/v1/files", response_model=FileList)
def list_files(tid: Tenant, store: StoreDep, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, order: Literal["asc", "desc"] = "desc",
               purpose: str | None = None) -> dict[str, Any]:
    """The caller's uploads as OpenAI's page (``client.files.list()``), newest first unless ``order=asc``;
    ``after`` is the last id of the previous page. Every file here has the purpose ``fine-tune``."""
    files = [r.public() for r in store.list_files(tid) if purpose in (None, PURPOSE)]
    return page(files[::-1] if order == "desc" else files, after, limit)


@router.get("/v1/files/{file_id}", response_model=FileInfo)
def get_file(file_id: str, tid: Tenant, store: StoreDep) -> FileInfo:
    return FileInfo(**own_file(store, file_id, tid).public())


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, tid: Tenant, store: StoreDep) -> FileResponse:
    rec = own_file(store, file_id, tid)
    return FileResponse(store.file_path(rec.id, rec.ext), filename=rec.filename, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, tid: Tenant, store: StoreDep) -> dict[str, Any]:
    """Delete the upload (409 while an active job reads it); the answer is OpenAI's ``files.delete`` object."""
    rec = own_file(store, file_id, tid)
    busy = [j.id for j in store.list_jobs(tid, ACTIVE_STATES) if _uses_file(j.spec, rec.id)]
    if busy:
        raise HTTPException(409, f"file {file_id} is used by active job(s) {busy}; cancel them first")
    store.delete_file(rec)
    return {"id": rec.id, "object": "file", "deleted": True}


def _uses_file(spec: dict[str, Any], file_id: str) -> bool:
    return any((spec.get(k) or {}).get("file_id") == file_id for k in ("train", "eval"))
