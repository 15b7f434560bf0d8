"""``/v1/jobs``: submit a training job, list the caller's jobs, read one's status and metrics, cancel it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response

from cotune.errors import CotuneError
from cotune.service.admission import step_tokens
from cotune.service.config import ServiceConfig
from cotune.service.routes.deps import ConfigDep, RunnerDep, StoreDep, Tenant, own_file, own_job
from cotune.service.schemas import JobInfo, JobSpec, Metric
from cotune.service.store import ACTIVE_STATES, CANCELLED, FINAL_STATES, Store, new_id

router = APIRouter(tags=["jobs"])


def check_data(store: Store, config: ServiceConfig, ref: dict[str, Any] | None, tid: str, field: str) -> None:
    """A job's data reference is the caller's upload, a path under the data roots, or a hub name if allowed."""
    if ref is None:
        return
    if ref.get("file_id"):
        own_file(store, ref["file_id"], tid)
    elif ref.get("path"):
        p = Path(ref["path"]).expanduser().resolve()  # resolve first: ``..`` and symlinks cannot escape
        if not any(p.is_relative_to(r) for r in config.data_roots):
            roots = [str(r) for r in config.data_roots] or "none configured (cotune serve --data-root DIR)"
            raise HTTPException(403, f"{field}.path {ref['path']!r} is outside the server's data roots: {roots}")
        if not p.exists():
            raise HTTPException(400, f"{field}.path {ref['path']!r} does not exist on the server")
    elif ref.get("hub") and not config.allow_hub:
        raise HTTPException(403, f"{field}.hub: this server does not load hub data sets (cotune serve --allow-hub)")


@router.post("/v1/jobs", response_model=JobInfo, status_code=201)
def submit(spec: JobSpec, tid: Tenant, store: StoreDep, config: ConfigDep, runner: RunnerDep) -> JobInfo:
    """Submit a training job; it trains together with every other tenant's jobs on the shared base."""
    check_data(store, config, spec.train.model_dump(), tid, "train")
    check_data(store, config, spec.eval.model_dump() if spec.eval else None, tid, "eval")
    if spec.steps > config.max_steps:
        raise HTTPException(400, f"steps={spec.steps} exceeds the server's limit of {config.max_steps}")
    if spec.batch_size > config.max_batch_size:
        raise HTTPException(400, f"batch_size={spec.batch_size} exceeds the limit of {config.max_batch_size}")
    if spec.max_length > config.max_length:
        raise HTTPException(400, f"max_length={spec.max_length} exceeds the limit of {config.max_length}")
    if spec.eval_every is not None and (midway := (spec.steps - 1) // spec.eval_every) > config.max_job_evals:
        least = (spec.steps - 1) // (config.max_job_evals + 1) + 1
        raise HTTPException(400, f"eval_every={spec.eval_every} evaluates {midway} times before the end of "
                                 f"{spec.steps} steps; this server allows {config.max_job_evals} per job, since each "
                                 f"holds up every job's training: set eval_every to {least} or more")
    if (tokens := step_tokens(spec.model_dump())) > config.max_step_tokens:
        accum = "engine_options.interval" if spec.engine == "gl" else "engine_options.grad_accum"
        raise HTTPException(400, f"batch_size x max_length = {tokens} tokens per step; this server trains at most "
                                 f"{config.max_step_tokens} per job and round, so that no job holds up the others: "
                                 f"lower batch_size (and raise {accum} for the same batch per update) or max_length")
    if config.tenant_compute_tokens is not None:
        used, planned = compute_of(store, tid)
        if used + planned + spec.steps * tokens > config.tenant_compute_tokens:
            raise HTTPException(429, f"your compute quota is {config.tenant_compute_tokens} token slots (steps x "
                                     f"batch_size x max_length); {used} are used and {planned} planned by your active "
                                     f"jobs, and this job needs {spec.steps * tokens}: lower steps, batch_size or "
                                     "max_length, or ask the operator for more")
    try:
        runner.check_admission(spec.model_dump())  # the training step's memory budget (once the model is loaded)
    except CotuneError as e:
        raise HTTPException(413, str(e)) from e
    if store.usage(tid) >= config.tenant_storage_bytes:
        raise HTTPException(413, f"your storage quota of {config.tenant_storage_bytes} bytes is used up, and a job "
                                 "writes an adapter: delete files or adapters first")
    active = store.list_jobs(tid, ACTIVE_STATES)
    if len(active) >= config.max_active_jobs:
        raise HTTPException(429, f"{len(active)} active jobs: the limit per tenant is {config.max_active_jobs}")
    jid = new_id()
    store.add_job(jid, tid, spec.model_dump(), spec.steps)
    runner.notify()
    return JobInfo(**store.get_job(jid).public())  # type: ignore[union-attr]


def compute_of(store: Any, tid: str) -> tuple[int, int]:
    """The tenant's compute in token slots: (trained, deleted jobs included; still to train by active jobs)."""
    t = store.tenant(tid) or {}
    jobs = store.list_jobs(tid)
    used = int(t.get("deleted_compute") or 0) + sum(j.step * step_tokens(j.spec) for j in jobs)
    planned = sum((j.total_steps - j.step) * step_tokens(j.spec) for j in jobs if j.status in ACTIVE_STATES)
    return used, planned


@router.get("/v1/jobs", response_model=list[JobInfo])
def list_jobs(tid: Tenant, store: StoreDep) -> list[JobInfo]:
    return [JobInfo(**j.public()) for j in store.list_jobs(tid)]


@router.get("/v1/jobs/{job_id}", response_model=JobInfo)
def job_status(job_id: str, tid: Tenant, store: StoreDep) -> JobInfo:
    """Status, progress (step / total_steps), last checkpoint, error reason and final metrics."""
    return JobInfo(**own_job(store, job_id, tid).public())


@router.get("/v1/jobs/{job_id}/metrics", response_model=list[Metric])
def job_metrics(
    job_id: str,
    tid: Tenant,
    store: StoreDep,
    since_step: int = -1,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> list[Metric]:
    own_job(store, job_id, tid)
    return [Metric(**m) for m in store.metrics(job_id, since_step, limit)]


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobInfo)
def cancel(job_id: str, tid: Tenant, store: StoreDep, runner: RunnerDep) -> JobInfo:
    job = own_job(store, job_id, tid)
    if job.status in FINAL_STATES:
        raise HTTPException(409, f"job {job_id} already {job.status}")
    store.update_job(job_id, status=CANCELLED, finished=time.time())
    runner.notify()
    return JobInfo(**own_job(store, job_id, tid).public())


@router.delete("/v1/jobs/{job_id}", status_code=204)
def delete_job(job_id: str, tid: Tenant, store: StoreDep, runner: RunnerDep) -> Response:
    """Delete a finished, failed or cancelled job with its metrics, checkpoints and adapter (active: 409)."""
    job = own_job(store, job_id, tid)
    if job.status not in FINAL_STATES:
        raise HTTPException(409, f"job {job_id} is {job.status}: cancel it first (POST /v1/jobs/{job_id}/cancel)")
    runner.forget(job)
    store.delete_job(job.id, compute=job.step * step_tokens(job.spec))
    return Response(status_code=204)


@router.delete("/v1/jobs/{job_id}/adapter", status_code=204)
def delete_adapter(job_id: str, tid: Tenant, store: StoreDep, runner: RunnerDep) -> Response:
    """Delete a job's trained adapter, freeing its storage; the job's record and metrics stay."""
    job = own_job(store, job_id, tid)
    folder = store.adapter_dir(job.id)
    if not folder.is_dir():
        raise HTTPException(404, f"job {job_id} has no adapter")
    runner.forget(job)
    shutil.rmtree(folder, ignore_errors=True)
    return Response(status_code=204)
