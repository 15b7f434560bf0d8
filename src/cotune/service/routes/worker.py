"""``/v1/jobs/{id}/worker``: the HTTP side of ColA's split for a job with ``engine_options.fitter = "remote"``.

The job's owner runs ``cotune worker`` on their own machine, with their own token; the server never holds that
job's optimizer. The worker reads the adapter description and the current weights, then repeats: fetch the
awaited capture frame (long poll), send back the weights frame of that update. Frames are safetensors
(``cotune.engines.gradient_learning.remote``) in the job's spool on disk (``Jobs.spool``): streamed from and to
the files, so K remote tenants cost the server no frame buffers. Another tenant's job is a 404 here as everywhere.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from cotune.engines.gradient_learning.remote import StaleUpdate
from cotune.errors import CotuneError, Unavailable
from cotune.service.jobs import SPOOL
from cotune.service.routes.deps import RunnerDep, StoreDep, Tenant, own_job
from cotune.service.store import FINAL_STATES, PAUSED, QUEUED, JobRecord

router = APIRouter(tags=["worker"])

#: how long one capture request waits for the frame before answering 204 (the worker asks again)
LONG_POLL_S = 20.0
DELIVER_TIMEOUT_S = 120.0
CHUNK = 1 << 20


def _stream(path: str, headers: dict[str, str] | None = None) -> Response | None:
    """The file as a streamed response (``None`` when the trainer has replaced it meanwhile: look again).

    Opened here, so a frame removed while it is sent is still sent whole."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the response's background task
    except FileNotFoundError:
        return None
    size = os.fstat(fh.fileno()).st_size
    return StreamingResponse(iter(lambda: fh.read(CHUNK), b""), media_type="application/octet-stream",
                             headers={**(headers or {}), "Content-Length": str(size)}, background=BackgroundTask(fh.close))


def remote_job(store: Any, job_id: str, tid: str) -> JobRecord:
    job = own_job(store, job_id, tid)
    opts = job.spec.get("engine_options") or {}
    if job.spec.get("engine") != "gl" or opts.get("fitter") != "remote":
        raise HTTPException(409, f"job {job_id} does not train with a remote fitter (engine 'gl' with "
                                 "engine_options.fitter = 'remote')")
    return job


@router.get("/v1/jobs/{job_id}/worker")
def worker_info(job_id: str, tid: Tenant, store: StoreDep, runner: RunnerDep) -> dict[str, Any]:
    """The job's state for its worker: status, steps, the adapter description once it trains, the applied update.

    A job paused for want of its worker is queued again by this request (the worker is back)."""
    job = remote_job(store, job_id, tid)
    if job.status == PAUSED and store.update_job(job.id, only_if=(PAUSED,), status=QUEUED, error=None):
        runner.notify()
        job = remote_job(store, job_id, tid)
    view = runner.remote_view(job.id) or {}
    return {"job_id": job.id, "status": job.status, "step": job.step, "total_steps": job.total_steps,
            "interval": int((job.spec.get("engine_options") or {}).get("interval", 1)),
            "setup": view.get("setup"), "applied": view.get("applied"), "error": job.error}


@router.get("/v1/jobs/{job_id}/worker/weights")
def worker_weights(job_id: str, tid: Tenant, store: StoreDep, runner: RunnerDep) -> Response:
    """The job's adapter weights after its last applied update (a weights frame)."""
    job = remote_job(store, job_id, tid)
    view = runner.remote_view(job.id)
    response = _stream(view["weights"]) if view and view.get("weights") else None
    if response is None:
        raise HTTPException(409, f"job {job_id} is {job.status}, not training: no weights to start from")
    return response


@router.get("/v1/jobs/{job_id}/worker/capture")
async def worker_capture(job_id: str, tid: Tenant, store: StoreDep, runner: RunnerDep) -> Response:
    """The capture frame the job awaits weights for (header ``X-Cotune-Update``); 204 after a wait without one,
    410 once the job has ended."""
    end = time.monotonic() + LONG_POLL_S
    while True:
        job = await asyncio.to_thread(remote_job, store, job_id, tid)
        if job.status in FINAL_STATES:
            raise HTTPException(410, f"job {job_id} is {job.status}")
        frame = (runner.remote_view(job.id) or {}).get("frame")
        response = _stream(frame[1], {"X-Cotune-Update": str(frame[0])}) if frame is not None else None
        if response is not None:
            return response
        if time.monotonic() > end:
            return Response(status_code=204)
        await asyncio.sleep(0.02)


@router.post("/v1/jobs/{job_id}/worker/weights")
async def worker_deliver(job_id: str, request: Request, tid: Tenant, store: StoreDep, runner: RunnerDep) -> dict[str, Any]:
    """The worker's weights frame for the awaited update: checked (names, shapes, dtypes, finite) and applied
    before the job's next step; a bad one is a 400 and the job's adapter stays as it was."""
    await asyncio.to_thread(remote_job, store, job_id, tid)
    view = runner.remote_view(job_id)
    if not view or "max_weights_bytes" not in view:
        raise HTTPException(409, f"job {job_id} is not training now (queued, restarting or ended): fetch "
                                 f"/v1/jobs/{job_id}/worker, then the capture, before sending weights")
    limit = int(view["max_weights_bytes"])  # the adapter's own size, not the upload limit: a frame is never larger
    spool = store.job_dir(job_id) / SPOOL
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / f"incoming-{uuid.uuid4().hex}.safetensors"  # the trainer consumes it, whatever the outcome
    size = 0
    try:
        with open(path, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"weights frame over {limit} bytes, the size of this job's adapter "
                                             "weights with their header: not this job's weights frame")
                fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    try:
        return await asyncio.wait_for(asyncio.wrap_future(runner.deliver_weights(job_id, str(path))),
                                      timeout=DELIVER_TIMEOUT_S)
    except Unavailable as e:
        raise HTTPException(503, str(e)) from e
    except StaleUpdate as e:  # not awaited (now): the worker fetches the awaited capture again
        raise HTTPException(409, str(e)) from e
    except CotuneError as e:
        raise HTTPException(400, str(e)) from e
    except TimeoutError as e:
        raise HTTPException(503, "the trainer did not take the weights in time; send them again") from e
