"""OpenAI's fine-tuning API over cotune's jobs: ``/v1/fine_tuning/jobs`` (create, list, retrieve, cancel, events).

A fine-tuning job *is* a cotune job, with the same id (also shown by ``/v1/jobs``): ``create`` turns OpenAI's
body into a :class:`JobSpec` and hands it to ``routes.jobs.submit``, so every limit and quota applies unchanged.
What OpenAI leaves to the server is decided here:

* ``model`` is the server's base model (the name ``GET /v1/models`` lists first), trained with the default adapter
  (LoRA, ``lowrank``); cotune's own ``POST /v1/jobs`` chooses among all families and engines;
* ``n_epochs`` becomes steps from the training file's rows (JSONL lines, or a JSON array's items):
  ``ceil(n_epochs x rows / batch_size)``. ``auto`` means 3 epochs, fewer where 3 would pass the server's step
  limit; ``batch_size`` ``auto`` is 8; ``learning_rate_multiplier`` scales the method's tuned rate;
* every row of the training file trains (none is held out); a ``validation_file`` is scored (loss over its answer
  tokens) at the end and at up to four points on the way, as metrics events;
* ``fine_tuned_model`` is the job id: the ``model`` that ``/v1/chat/completions`` takes once the job succeeded.

What was asked (epochs, multiplier) is kept beside the job as ``openai.json``; only jobs that have it are listed.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import Field

from cotune.adapters.methods import default_lr
from cotune.service.routes import jobs as job_routes
from cotune.service.routes.deps import ConfigDep, RunnerDep, StoreDep
from cotune.service.routes.openai import OpenAIError, OpenAITenant, page
from cotune.service.schemas import DataRef, JobSpec, OpenAIBody, OptimSpec
from cotune.service.store import CANCELLED, FAILED, SUCCEEDED, JobRecord, Store, atomic_write_json
from cotune.service.workload import model_task_for

#: What a job created here asked for, beside its checkpoints (deleted with it).
ASKED = "openai.json"
#: OpenAI's ``auto``: epochs and batch size.
AUTO_EPOCHS, AUTO_BATCH = 3, 8
#: Tokens per training row at most (the task's own default); the server's limits may lower it.
MAX_LENGTH = 512
#: Midway evaluations of a job with a validation file (within the server's ``max_job_evals``).
VALIDATIONS = 4
METHOD = "lowrank"

router = APIRouter(tags=["fine-tuning (OpenAI-compatible)"])


class Hyperparameters(OpenAIBody):
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = "auto"


class Supervised(OpenAIBody):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(OpenAIBody):
    type: Literal["supervised"] = Field(description="supervised fine-tuning only (no dpo, no reinforcement)")
    supervised: Supervised | None = None


class FineTuningRequest(OpenAIBody):
    model: str = Field(min_length=1, description="the server's base model")
    training_file: str = Field(min_length=1, description="an uploaded file's id (JSONL, or an Alpaca JSON array)")
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = Field(default=None, description="OpenAI's older place for them")
    method: Method | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    suffix: str | None = Field(default=None, description="not supported: the fine-tuned model is the job id")
    integrations: list[Any] | None = Field(default=None, description="not supported")
    metadata: dict[str, Any] | None = Field(default=None, description="not supported")


@functools.cache
def _model_task(model: str) -> str:
    return model_task_for(model)  # reads the model's config.json: once per server


def count_rows(store: Store, file_id: str, tid: str, param: str) -> int:
    """Training rows in the caller's upload ``file_id``: its non-blank JSONL lines, or its JSON array's items."""
    rec = store.get_file(file_id, tid)
    if rec is None:
        raise OpenAIError(404, f"no file {file_id!r}: upload it with files.create (purpose 'fine-tune')", param=param)
    path = store.file_path(rec.id, rec.ext)
    if rec.ext == ".jsonl":
        with open(path, "rb") as f:
            rows = sum(1 for line in f if line.strip())
    elif rec.ext == ".json":
        try:
            items = json.loads(path.read_bytes())
        except ValueError as e:
            raise OpenAIError(400, f"{param} {rec.filename!r} is not valid JSON: {e}", param=param) from e
        if not isinstance(items, list):
            raise OpenAIError(400, f"{param} {rec.filename!r}: a JSON file must be an array of rows", param=param)
        rows = len(items)
    else:
        raise OpenAIError(400, f"{param} {rec.filename!r}: fine-tuning reads JSONL (one {{\"messages\": [...]}} or "
                               "{\"prompt\", \"completion\"} per line) or an Alpaca JSON array", param=param)
    if rows == 0:
        raise OpenAIError(400, f"{param} {rec.filename!r} has no rows", param=param)
    return rows


def _plan(hp: Hyperparameters, rows: int, max_steps: int, max_batch: int) -> tuple[int, int, int]:
    """(epochs, batch_size, steps) for ``rows`` training rows."""
    batch = min(AUTO_BATCH, max_batch) if hp.batch_size == "auto" else hp.batch_size
    if hp.n_epochs != "auto":
        return hp.n_epochs, batch, math.ceil(hp.n_epochs * rows / batch)
    epochs = max(1, min(AUTO_EPOCHS, max_steps * batch // rows))
    return epochs, batch, math.ceil(epochs * rows / batch)


@router.post("/v1/fine_tuning/jobs")
def create(body: FineTuningRequest, tid: OpenAITenant, store: StoreDep, config: ConfigDep,
           runner: RunnerDep) -> dict[str, Any]:
    """Create a fine-tuning job (OpenAI's ``client.fine_tuning.jobs.create``)."""
    if body.model != config.model_id:
        raise OpenAIError(400, f"model {body.model!r}: this server fine-tunes its base model {config.model_id!r}",
                          param="model", code="model_not_available")
    for name in ("suffix", "integrations", "metadata"):
        if getattr(body, name):
            raise OpenAIError(400, f"{name} is not supported by this server; leave it out", param=name)
    if _model_task(config.model) != "causal_lm":
        raise OpenAIError(400, f"{config.model_id!r} is an encoder: fine-tuning here trains chat models; train "
                               "classifiers with POST /v1/jobs", param="model")
    hp = (body.method.supervised.hyperparameters if body.method and body.method.supervised else None) \
        or body.hyperparameters or Hyperparameters()
    rows = count_rows(store, body.training_file, tid, "training_file")
    if body.validation_file:
        count_rows(store, body.validation_file, tid, "validation_file")
    epochs, batch, steps = _plan(hp, rows, config.max_steps, config.max_batch_size)
    if steps > config.max_steps:
        raise OpenAIError(400, f"n_epochs={epochs} over {rows} rows at batch_size {batch} is {steps} steps; this "
                               f"server's limit is {config.max_steps}: lower n_epochs or raise batch_size",
                          param="hyperparameters.n_epochs")
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    n_evals = min(VALIDATIONS, config.max_job_evals)
    spec = JobSpec(
        task="causal_lm", method=METHOD, steps=steps, batch_size=batch,
        max_length=max(8, min(MAX_LENGTH, config.max_length, config.max_step_tokens // batch)),
        task_options={"val_fraction": 0.0, "test_fraction": 0.0, "metric": "loss"},  # every row trains
        train=DataRef(file_id=body.training_file),
        eval=DataRef(file_id=body.validation_file) if body.validation_file else None,
        eval_every=math.ceil(steps / (n_evals + 1)) if body.validation_file else None,
        optim=OptimSpec(lr=default_lr(METHOD) * multiplier),
        seed=secrets.randbelow(2**31) if body.seed is None else body.seed,
    )
    try:
        info = job_routes.submit(spec, tid, store, config, runner)
    except HTTPException as e:
        raise OpenAIError.of(e) from e
    folder = store.job_dir(info.id)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / ASKED, {"n_epochs": epochs, "learning_rate_multiplier": multiplier})
    return _job(*_own(store, info.id, tid), store, config.model_id)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(tid: OpenAITenant, store: StoreDep, config: ConfigDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    """The caller's fine-tuning jobs, newest first (``after``: the last id of the previous page)."""
    jobs = [_job(j, asked, store, config.model_id) for j in reversed(store.list_jobs(tid))
            if (asked := _asked(store, j.id))]
    return page(jobs, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve(job_id: str, tid: OpenAITenant, store: StoreDep, config: ConfigDep) -> dict[str, Any]:
    return _job(*_own(store, job_id, tid), store, config.model_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel(job_id: str, tid: OpenAITenant, store: StoreDep, config: ConfigDep, runner: RunnerDep) -> dict[str, Any]:
    _own(store, job_id, tid)  # a native job is not found here, as in retrieve
    try:
        job_routes.cancel(job_id, tid, store, runner)
    except HTTPException as e:
        raise OpenAIError.of(e) from e
    return _job(*_own(store, job_id, tid), store, config.model_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, tid: OpenAITenant, store: StoreDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    """The job's events, newest first: created, started, one per step (training and validation loss), the end."""
    return page(_events(_own(store, job_id, tid)[0], store)[::-1], after, limit)


def _asked(store: Store, job_id: str) -> dict[str, Any] | None:
    """What fine-tuning job ``job_id`` asked for; None for a job submitted to ``POST /v1/jobs``."""
    try:
        return json.loads((store.job_dir(job_id) / ASKED).read_text())
    except FileNotFoundError:
        return None


def _own(store: Store, job_id: str, tid: str) -> tuple[JobRecord, dict[str, Any]]:
    """The caller's fine-tuning job and what it asked for (404 in OpenAI's shape otherwise)."""
    job = store.get_job(job_id, tid)
    asked = _asked(store, job.id) if job else None
    if job is None or asked is None:
        raise OpenAIError(404, f"no fine-tuning job {job_id!r} (a job submitted to POST /v1/jobs is read at "
                               "GET /v1/jobs/{id})", param="fine_tuning_job_id", code="not_found")
    return job, asked


def _job(job: JobRecord, asked: dict[str, Any], store: Store, base: str) -> dict[str, Any]:
    """The job as OpenAI's ``fine_tuning.job`` object (``trained_tokens`` once it succeeded, as OpenAI's)."""
    spec = job.spec
    tokens = store.metric_total(job.id, "tokens") if job.status == SUCCEEDED else None
    hyper = {"n_epochs": asked["n_epochs"], "batch_size": spec["batch_size"],
             "learning_rate_multiplier": asked["learning_rate_multiplier"]}
    return {
        "object": "fine_tuning.job", "id": job.id, "model": base, "created_at": int(job.created),
        "finished_at": int(job.finished) if job.finished else None,
        "fine_tuned_model": job.id if job.status == SUCCEEDED else None,
        "organization_id": job.tenant_id, "status": job.status, "result_files": [],
        "training_file": spec["train"]["file_id"], "validation_file": (spec.get("eval") or {}).get("file_id"),
        "hyperparameters": hyper, "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "seed": spec["seed"], "trained_tokens": None if tokens is None else int(tokens), "estimated_finish": None,
        "integrations": [], "metadata": None,
        "error": {"code": "job_failed", "message": job.error, "param": None} if job.status == FAILED else None,
    }


def _events(job: JobRecord, store: Store) -> list[dict[str, Any]]:
    """Oldest first; an event's id is its place in this list, which only grows."""
    found: list[tuple[float, str, str, dict[str, Any] | None]] = [(job.created, "info", "Created fine-tuning job",
                                                                   None)]
    if job.started:
        found.append((job.started, "info", "Fine-tuning job started", None))
    rows = store.metrics(job.id, limit=100_000)
    valid = {m["step"]: m["value"] for m in rows if m["name"] == "eval_loss"}
    steps = {m["step"]: {"time": m["time"], "step": m["step"], "train_loss": m["value"], "total_steps": job.total_steps}
             for m in rows if m["name"] == "loss"}  # a resumed job's steps logged again: the last of each
    for step, data in steps.items():
        if step in valid:
            data["valid_loss"] = valid[step]
        text = f"Step {data['step']}/{job.total_steps}: training loss={data['train_loss']:.4f}"
        if "valid_loss" in data:
            text += f", validation loss={data['valid_loss']:.4f}"
        found.append((data.pop("time"), "info", text, data))
    if job.status == SUCCEEDED:
        found.append((job.finished or job.created, "info", "The job has successfully completed", None))
    elif job.status == FAILED:
        found.append((job.finished or job.created, "error", f"The job failed: {job.error}", None))
    elif job.status == CANCELLED:
        found.append((job.finished or job.created, "info", "The job was cancelled", None))
    return [{"object": "fine_tuning.job.event", "id": f"ftevent-{job.id}-{i}", "created_at": int(t), "level": level,
             "message": text, "data": data, "type": "metrics" if data else "message"}
            for i, (t, level, text, data) in enumerate(found)]
