"""``/v1/jobs/{job_id}/adapter``: a succeeded job's trained adapter, as a zip or file by file (PEFT's format)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from cotune.service.routes.deps import StoreDep, Tenant, own_job
from cotune.service.store import SUCCEEDED, Store

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

router = APIRouter(tags=["adapters"])


def finished_adapter(store: Store, job_id: str, tid: str) -> Path:
    """The adapter folder of the caller's job ``job_id`` (409 until the job has succeeded)."""
    job = own_job(store, job_id, tid)
    folder = store.adapter_dir(job.id)
    if job.status != SUCCEEDED or not all((folder / n).is_file() for n in ADAPTER_FILES):
        raise HTTPException(409, f"job {job_id} is {job.status}: the adapter is available once it succeeded")
    return folder


@router.get("/v1/jobs/{job_id}/adapter")
def download_adapter(job_id: str, tid: Tenant, store: StoreDep) -> Response:
    """The trained adapter as a zip of ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT)."""
    folder = finished_adapter(store, job_id, tid)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n in ADAPTER_FILES:
            z.write(folder / n, arcname=n)
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="adapter-{job_id}.zip"'})


@router.get("/v1/jobs/{job_id}/adapter/{name}")
def download_adapter_file(job_id: str, name: str, tid: Tenant, store: StoreDep) -> FileResponse:
    if name not in ADAPTER_FILES:  # a fixed list: no path from the client reaches the file system
        raise HTTPException(404, f"no adapter file {name!r}; files: {ADAPTER_FILES}")
    return FileResponse(finished_adapter(store, job_id, tid) / name, filename=name)
