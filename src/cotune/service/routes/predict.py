"""``POST /v1/jobs/{job_id}/predict``: predictions with a job's adapter, batched with every tenant's requests."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException

from cotune.errors import CotuneError, Unavailable
from cotune.service.routes.deps import ConfigDep, RunnerDep, StoreDep, Tenant, own_job
from cotune.service.schemas import PredictRequest
from cotune.service.store import SUCCEEDED

#: Seconds a prediction may wait for the runner before the client gets a 503.
PREDICT_TIMEOUT_S = 120

router = APIRouter(tags=["adapters"])


@router.post("/v1/jobs/{job_id}/predict")
async def predict(
    job_id: str, body: PredictRequest, tid: Tenant, store: StoreDep, config: ConfigDep, runner: RunnerDep
) -> dict[str, Any]:
    """Predictions with this job's adapter; concurrent requests of all tenants share one base pass."""
    job = await asyncio.to_thread(own_job, store, job_id, tid)
    if job.status not in (SUCCEEDED, "running"):
        raise HTTPException(409, f"job {job_id} is {job.status}: predictions need a running or finished job")
    if len(body.inputs) > config.max_predict_inputs:
        raise HTTPException(413, f"{len(body.inputs)} inputs; the limit is {config.max_predict_inputs}")
    if sum(len(x) for x in body.inputs) > config.max_predict_chars:
        raise HTTPException(413, f"inputs exceed {config.max_predict_chars} characters in total")
    fut = runner.submit_predict(job, body.inputs, body.max_new_tokens)
    try:
        out = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=PREDICT_TIMEOUT_S)
    except Unavailable as e:
        raise HTTPException(503, str(e)) from e
    except CotuneError as e:
        raise HTTPException(400, str(e)) from e
    except TimeoutError as e:
        raise HTTPException(503, "prediction timed out; the server is overloaded") from e
    return {"job_id": job_id, "predictions": out}
