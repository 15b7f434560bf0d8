"""The service's jobs on the shared trainer: start (or resume), one round for all, checkpoints, finish, failure.

Each job is a tenant of the ``TenantBank`` trained by its own engine through ONE ``MultiTenantTrainer``; a
round is one mixed step of every active job (fair share: one step each). A job's randomness is a function of
(seed, step): the rows of step ``k`` and the dropout draws of step ``k`` are the same whether or not the
server was killed in between, so a resumed job continues exactly where the uninterrupted one would have been.

Failures stay inside their job: bad data, a bad method option or a NaN storm marks that job ``failed`` with
the reason, and the others go on.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cotune.errors import CotuneError
from cotune.service import checkpoints
from cotune.service.admission import Admission
from cotune.service.config import ServiceConfig
from cotune.service.predictions import LoadedAdapters
from cotune.service.store import (
    CANCELLED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    Store,
    atomic_write_bytes,
)
from cotune.service.workload import Workload, build_workload, check_adapter_size
from cotune.tasks.metrics import collapse_warning, one_class_warning

log = logging.getLogger("cotune.service")


#: what a job may set of its engine (where the work runs, e.g. a gl fitter's placement, is the server's)
SERVICE_ENGINE_OPTIONS = {
    "backprop": ("grad_accum",),
    "gl": ("interval", "wire_dtype", "sufficient_statistic", "fitter"),
    "zo": ("eps", "n_directions", "zo_optimizer", "seed"),
}


#: a remote job's spool (under its job directory) and the file its worker starts from
SPOOL, WEIGHTS = "worker", "weights.safetensors"
#: what a weights frame may hold beyond the adapter's tensors (its header: the update and the worker's stats)
WEIGHTS_SLACK = 64 * 2**10


def step_seed(seed: int, step: int) -> int:
    """The torch seed of a job's step: depends only on the job's seed and the step index."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def _optim_config(spec: dict[str, Any]) -> Any:
    from cotune.engines.base import OptimConfig
    from cotune.training.config import optim_lr

    o = spec.get("optim") or {}
    optimizer = o.get("optimizer", "adamw")
    lr = o.get("lr")
    return OptimConfig(
        optimizer=optimizer, lr=float(lr if lr is not None else optim_lr(spec["method"], spec["engine"], optimizer)),
        weight_decay=float(o.get("weight_decay", 0.0)), momentum=float(o.get("momentum", 0.0)),
        scheduler=o.get("scheduler", "constant"), warmup_steps=int(o.get("warmup_steps", 0)),
        total_steps=int(spec["steps"]), max_grad_norm=o.get("max_grad_norm"),
    )


@dataclass
class ActiveJob:
    """A job being trained: its record, tenant key, workload and where it is."""

    rec: JobRecord
    key: str
    workload: Workload
    step: int
    checkpoint_every: int
    eval_every: int | None = None  # evaluate midway too, every this many steps (the spec's eval_every)
    evaluated_at: int = 0  # the step of its last midway evaluation (or where it started)
    last_loss: float | None = None
    skipped: int = 0
    remote: Any = None  # its RemoteFitter when its updates run in the tenant's ``cotune worker``
    awaiting_since: float | None = None  # when it started waiting for its worker's weights


class Jobs:
    """The active jobs on one bank and trainer (driven by the runner's worker thread only)."""

    def __init__(self, config: ServiceConfig, store: Store, bank: Any, trainer: Any, mixer: Any, tokenizer: Any,
                 model_task: str, loaded: LoadedAdapters, admission: Admission) -> None:
        self.config, self.store, self.bank, self.trainer, self.mixer = config, store, bank, trainer, mixer
        self.tokenizer, self.model_task, self.loaded, self.admission = tokenizer, model_task, loaded, admission
        self.active: dict[str, ActiveJob] = {}
        self.rounds = 0
        self._delivered_last: list[ActiveJob] = []
        #: ``on_remote(job id, fields)``: what a remote job's worker may fetch changed (``None``: it left)
        self.on_remote: Callable[[str, dict[str, Any] | None], None] = lambda job_id, fields: None

    def sync(self) -> None:
        """Drop cancelled jobs; start (or resume) queued ones."""
        for job in list(self.active.values()):
            rec = self.store.get_job(job.rec.id)
            if rec is None or rec.status == CANCELLED:
                self._drop(job)
                checkpoints.discard(self.store.job_dir(job.rec.id))
        for rec in self.store.list_jobs(statuses=(QUEUED, RUNNING)):
            if rec.key in self.active:
                continue
            if not self.admission.fits([j.rec.spec for j in self.active.values()], rec.spec):
                if self.active:  # it fits alone (checked at submit): it waits, queued, until others finish
                    continue
                try:
                    self.admission.refuse_alone(rec.spec)  # a budget lowered since it was submitted
                except CotuneError as e:
                    self._fail(rec, e)
                    continue
            self._start_job(rec)

    def checkpoint_all(self) -> None:
        """Graceful stop: every job checkpointed where it is."""
        for job in list(self.active.values()):
            self._guard(job, self._checkpoint, job)

    def _start_job(self, rec: JobRecord) -> None:
        """Add the job to the bank and its trainer, from its last checkpoint when it has one."""
        key = rec.key
        engine = rec.spec.get("engine", "backprop")
        try:
            self.loaded.unload(key)
            job_dir = self.store.job_dir(rec.id)
            workload = build_workload(rec.spec, self._data_refs(rec), self.tokenizer, self.bank.model,
                                      self.model_task, job_dir)
            check_adapter_size(self.bank.model, workload.adapter_configs, self.config.max_adapter_params)
            # the initial weights follow the seed as in ``cotune train`` (seeded, then attached): same job, same start
            torch.manual_seed(int(rec.spec.get("seed", 0)))
            self.bank.add_tenant(key, workload.adapter_configs, head=workload.head)
            try:
                step, trainer_state = 0, None
                ckpt = checkpoints.latest(job_dir)
                if ckpt is not None:
                    state, trainer_state = checkpoints.load(ckpt, self.bank.model, key)
                    step = int(state["step"])
                self.trainer.add(key, _optim_config(rec.spec), engine=engine, **self._engine_options(rec))
                if trainer_state is not None:
                    self.trainer.load_tenant_state_dict(key, trainer_state)
            except Exception:
                if key in self.trainer.training:
                    self.trainer.remove(key)
                self.bank.remove_tenant(key)
                raise
        except Exception as e:
            self._fail(rec, e)
            return
        # A restart repeats the steps after the last checkpoint: their metrics go, to be logged again once.
        # Without a checkpoint that is every step, and the step-0 notes below are written again too.
        self.store.truncate_metrics(rec.id, step if step > 0 else -1)
        if workload.truncated_rows and step == 0:
            self.store.add_metrics(rec.id, 0, {"truncated_rows": workload.truncated_rows})
            log.warning("job %s: %d training rows are longer than max_length=%d and are cut", rec.id,
                        workload.truncated_rows, workload.max_length)
        if workload.warnings and step == 0:  # flagged in the metrics from the start, spelled out in the result
            self.store.add_metrics(rec.id, 0, dict.fromkeys(workload.warnings, 1.0))
            log.warning("job %s: %s", rec.id, "; ".join(workload.warnings.values()))
        every = rec.spec.get("checkpoint_every") or self.config.checkpoint_every
        self.active[key] = ActiveJob(rec, key, workload, step, every, eval_every=rec.spec.get("eval_every"),
                                     evaluated_at=step)
        self._connect_remote(self.active[key])
        fields: dict[str, Any] = {"status": RUNNING, "step": step}
        if rec.started is None:
            fields["started"] = time.time()
        if step > 0:
            fields["resumed_from"] = step
        if not self.store.update_job(rec.id, only_if=(QUEUED, RUNNING), **fields):  # cancelled while it started
            self._drop(self.active[key])
            checkpoints.discard(self.store.job_dir(rec.id))
            return
        log.info("job %s %s at step %d/%d", rec.id, "resumed" if step else "started", step, rec.total_steps)

    def workload_for(self, rec: JobRecord) -> Workload:
        """The workload of a running or finished job, its adapter loaded in the bank (finished: from its folder)."""
        key = rec.key
        if key in self.active:
            return self.active[key].workload
        wl = self.loaded.get(key)
        if wl is not None:
            return wl
        folder = self.store.adapter_dir(rec.id)
        if rec.status != SUCCEEDED or not folder.is_dir():
            raise CotuneError(f"job {rec.id} has no adapter yet (status {rec.status})")
        wl = build_workload(rec.spec, None, self.tokenizer, self.bank.model, self.model_task, self.store.job_dir(rec.id))
        self.bank.add_tenant(key, folder)
        self.loaded.remember(key, wl)
        return wl

    def _data_refs(self, rec: JobRecord) -> dict[str, Any]:
        """The job's data references made concrete: uploaded file ids become their server paths."""
        out: dict[str, Any] = {}
        for name in ("train", "eval"):
            ref = rec.spec.get(name)
            if not ref:
                continue
            if ref.get("file_id"):
                f = self.store.get_file(ref["file_id"], rec.tenant_id)
                if f is None:
                    raise CotuneError(f"{name} file {ref['file_id']} no longer exists")
                out[name] = {"path": str(self.store.file_path(f.id, f.ext))}
            else:
                out[name] = dict(ref)
        return out

    @staticmethod
    def _engine_options(rec: JobRecord) -> dict[str, Any]:
        """The job's engine options; zo draws its directions from the job's seed (reproducible, resumable)."""
        engine = rec.spec.get("engine", "backprop")
        options = dict(rec.spec.get("engine_options") or {})
        allowed = SERVICE_ENGINE_OPTIONS.get(engine, ())
        refused = sorted(set(options) - set(allowed))
        if refused:
            raise CotuneError(f"engine_options {refused} are not accepted for {engine!r} service jobs; "
                              f"allowed: {list(allowed)}")
        if engine == "zo":
            options.setdefault("seed", int(rec.spec.get("seed", 0)))
        fitter = options.pop("fitter", "server")
        if fitter not in ("server", "remote"):
            raise CotuneError(f"engine_options.fitter must be 'server' (the default) or 'remote' (the update runs on "
                              f"your machine: cotune worker --job <id>), not {fitter!r}")
        if fitter == "remote":
            options["placement"] = "remote"
        return options

    def spool(self, job_id: str) -> Path:
        """Where a remote job's frames lie while its worker may fetch them (the API streams them from disk, so
        neither process keeps a copy of a frame in memory)."""
        return self.store.job_dir(job_id) / SPOOL

    def _connect_remote(self, job: ActiveJob) -> None:
        """A remote-fitter job: its frames go to its spool and ``on_remote``, and what its worker needs to start is
        published."""
        from cotune.engines.gradient_learning.remote import RemoteFitter, encode_weights

        fitter = getattr(self.trainer.engine_of(job.key), "fitter", None)
        if not isinstance(fitter, RemoteFitter):
            return
        job.remote = fitter
        spool = self.spool(job.rec.id)
        spool.mkdir(parents=True, exist_ok=True)
        for old in spool.glob("capture-*"):  # a frame of before a restart: its update is computed again
            old.unlink(missing_ok=True)
        frame = encode_weights(fitter.updates, fitter.weights())
        weights = spool / WEIGHTS
        atomic_write_bytes(weights, frame, durable=False)  # rebuilt here after any restart

        def outbox(update: int, frame: bytes, jid: str = job.rec.id) -> None:
            path = spool / f"capture-{update}.safetensors"
            atomic_write_bytes(path, frame, durable=False)  # a restart computes the capture again
            self.on_remote(jid, {"frame": (update, str(path))})

        fitter.outbox = outbox
        # a worker's answer is this frame with other numbers and its stats: anything much larger is not one
        self.on_remote(job.rec.id, {"setup": fitter.setup(), "applied": fitter.updates, "frame": None,
                                    "weights": str(weights), "max_weights_bytes": len(frame) + WEIGHTS_SLACK})

    def deliver(self, job_id: str, path: str) -> dict[str, Any]:
        """A remote job's worker sent the weights of the update it awaits (a file in the job's spool, written by the
        API): check, apply, then checkpoint or finish. The file is consumed whatever the outcome."""
        from cotune.engines.gradient_learning.remote import StaleUpdate

        incoming = Path(path)
        try:
            job = next((j for j in self.active.values() if j.rec.id == job_id), None)
            if job is None or job.remote is None:
                raise StaleUpdate(f"job {job_id} is not training now (queued, restarting or ended)")
            try:
                data = incoming.read_bytes()
            except FileNotFoundError as e:  # the job left the trainer (and its spool) meanwhile
                raise StaleUpdate(f"job {job_id} restarted while its weights came in; send them again") from e
            awaited = job.remote.awaiting
            stats = job.remote.deliver(data)  # CotuneError on a bad frame: the adapter stays as it was
            spool = self.spool(job_id)
            incoming.replace(spool / WEIGHTS)  # what a restarted worker starts from
            (spool / f"capture-{awaited}.safetensors").unlink(missing_ok=True)
        finally:
            incoming.unlink(missing_ok=True)
        job.awaiting_since = None
        worker_stats = {k: stats[k] for k in ("grad_norm", "lr", "fit_s") if isinstance(stats.get(k), int | float)}
        worker_stats["worker_bytes_out"] = job.remote.last_frame_bytes
        worker_stats["worker_bytes_in"] = len(data)  # what crossed the wire for this update, each way
        self.store.add_metrics(job_id, job.step, worker_stats)  # measured by the worker, where the optimizer is
        self.on_remote(job_id, {"applied": job.remote.updates, "frame": None})
        update = job.remote.updates
        if job.step >= job.rec.total_steps:
            self._delivered_last.append(job)  # finished by ``finish_delivered``, once the worker has its answer
        else:  # every applied update: a restart resumes exactly where the worker's weights are
            self._guard(job, self._evaluate_midway_and_checkpoint, job)
        return {"update": update, "step": job.step}

    def finish_delivered(self) -> None:
        """Finish the remote jobs whose last update came back (evaluation, adapter, succeeded)."""
        done, self._delivered_last = self._delivered_last, []
        for job in done:
            self._guard(job, self._finish, job)

    def _pause(self, job: ActiveJob) -> None:
        waited = time.monotonic() - (job.awaiting_since or time.monotonic())
        self._drop(job)  # its worker's view goes with it (``_leave_trainer``)
        self.store.update_job(job.rec.id, only_if=(RUNNING,), status=PAUSED, error=(
            f"paused: its worker sent no weights for update {job.remote.awaiting} in {waited:.0f} s; start "
            f"`cotune worker --job {job.rec.id}` and it resumes from its last update"))
        log.warning("job %s paused: no weights from its worker in %.0f s", job.rec.id, waited)

    def round(self) -> bool:
        """One step for every active job that can take one (one mixed step); False when none could."""
        self.rounds += 1
        jobs = []
        for job in list(self.active.values()):
            if job.remote is not None and job.remote.awaiting is not None:  # its worker has not answered yet
                if time.monotonic() - (job.awaiting_since or time.monotonic()) > self.config.worker_timeout_s:
                    self._pause(job)
                continue
            jobs.append(job)
        parts = []
        for job in jobs:
            try:
                parts.append((job.key, job.workload.batch(job.step)))
            except Exception as e:  # this job's data is bad: it fails, the others train
                self._drop(job)
                self._fail(job.rec, e)
        if not parts:
            return False
        # The base's dropout draws depend only on the (seed, step) of the jobs in the batch: a lone job's
        # step is the same computation after a restart as it would have been without one.
        mix = 0
        for job in sorted(jobs, key=lambda j: j.key):
            mix = (mix * 1_000_003 + step_seed(int(job.rec.spec.get("seed", 0)), job.step)) % (2**63 - 1)
        torch.manual_seed(mix)
        try:
            results = self._mixed_step(parts)
        except Exception as e:
            if len(parts) == 1:
                job = self.active[parts[0][0]]
                self._drop(job)
                self._fail(job.rec, e)
                return True
            # Find the culprit: step each job alone (a job's bad rows must not stop the others).
            for key, batch in parts:
                job = self.active[key]
                self._guard(job, lambda job=job, batch=batch: self._after_step(
                    job, self._mixed_step([(job.key, batch)])[job.key], batch))
            return True
        batches = dict(parts)
        for key, r in results.items():
            self._guard(self.active[key], self._after_step, self.active[key], r, batches[key])
        return True

    def _mixed_step(self, parts: list[tuple[str, Any]]) -> dict[str, Any]:
        self.bank.model.train()
        try:
            return self.trainer.step(self.mixer.collate(parts))
        finally:
            self.bank.model.eval()

    def _after_step(self, job: ActiveJob, r: Any, batch: dict[str, torch.Tensor]) -> None:
        job.step += 1
        job.last_loss = float(r.loss)
        job.skipped += int(bool(r.skipped))
        values = {"loss": job.last_loss}
        if "attention_mask" in batch:  # the step's real tokens, padding left out (OpenAI's ``trained_tokens``)
            values["tokens"] = float(batch["attention_mask"].sum())
        values.update({k: float(v) for k, v in (r.stats or {}).items() if isinstance(v, int | float)})
        self.store.add_metrics(job.rec.id, job.step, values)
        self.store.update_job(job.rec.id, step=job.step)
        if job.skipped > max(10, job.rec.total_steps // 2):
            reason = getattr(r, "reason", None) or "non-finite loss or gradient"
            raise CotuneError(f"{job.skipped} of {job.step} steps were skipped (last: {reason}); lower the lr "
                              "or check the data")
        if job.remote is not None and job.remote.awaiting is not None:
            job.awaiting_since = time.monotonic()  # checkpoint or finish once its worker's weights are back
            return
        if job.step >= job.rec.total_steps:
            self._finish(job)
            return
        if job.remote is None:  # a remote job's adapter moves when its worker's weights come back (``deliver``)
            self._evaluate_midway(job)
        if job.step % job.checkpoint_every == 0:
            self._checkpoint(job)

    def _guard(self, job: ActiveJob, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            self._drop(job)
            self._fail(job.rec, e)

    def _trainer_state(self, job: ActiveJob) -> dict[str, Any]:
        return self.trainer.tenant_state_dict(job.key)

    def _checkpoint(self, job: ActiveJob) -> None:
        state = {"step": job.step, "loss": job.last_loss, "time": time.time()}
        checkpoints.save(self.store.job_dir(job.rec.id), self.bank.model, job.key, self._trainer_state(job), state)
        self.store.update_job(job.rec.id, checkpoint_step=job.step)

    def _evaluate(self, job: ActiveJob, final: bool) -> tuple[dict[str, float], list[str]]:
        """Evaluate the job's adapter now and log ``eval_*`` at its step, with a flag for each warning it earns
        (one answer for every row; one class only at the end, since early in a run it is normal)."""
        from cotune.adapters.attach import set_active

        set_active(self.bank.model, job.key)
        try:
            metrics = job.workload.evaluate(self.bank.model)
        finally:
            set_active(self.bank.model, None)
        values = {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        task = job.workload.task
        names = getattr(task, "label_names", None)  # a seq_cls task's; other task types have none
        checks = [("warning_collapsed", collapse_warning(metrics, task.metric))]
        if final:
            checks.append(("warning_one_class_predicted", one_class_warning(metrics, task.metric, names)))
        warnings = []
        for name, warning in checks:
            if warning is not None:  # a job that lost its run, or never left one answer
                warnings.append(warning)
                values[name] = 1.0
                log.warning("job %s at step %d: %s", job.rec.id, job.step, warning)
        self.store.add_metrics(job.rec.id, job.step, values)
        return metrics, warnings

    def _evaluate_midway(self, job: ActiveJob) -> None:
        """The spec's ``eval_every``: evaluate once whenever the job has passed a multiple of it (a remote job's
        steps arrive an update of I micro-batches at a time)."""
        every = job.eval_every
        if every and job.workload.has_eval and job.step // every > job.evaluated_at // every:
            job.evaluated_at = job.step
            self._evaluate(job, final=False)

    def _evaluate_midway_and_checkpoint(self, job: ActiveJob) -> None:
        self._evaluate_midway(job)
        self._checkpoint(job)

    def _finish(self, job: ActiveJob) -> None:
        result: dict[str, Any] = {"train_loss": job.last_loss, "skipped_steps": job.skipped,
                                  "truncated_rows": job.workload.truncated_rows,
                                  "warnings": list(job.workload.warnings.values())}
        if job.workload.has_eval:
            result["eval"], warnings = self._evaluate(job, final=True)
            result["metric"] = job.workload.task.metric  # its task's primary metric (what `client metrics --plot` draws)
            result["warnings"] += warnings
        job_dir = self.store.job_dir(job.rec.id)
        tmp, final = job_dir / ".adapter.tmp", self.store.adapter_dir(job.rec.id)
        shutil.rmtree(tmp, ignore_errors=True)
        self.bank.save_tenant(job.key, tmp, base_model=self.config.model_id)  # its public name, not a server path
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        # a cancel that came during the last step wins: the job stays cancelled (its adapter is there to delete)
        self.store.update_job(job.rec.id, only_if=(RUNNING,), status=SUCCEEDED, step=job.step, finished=time.time(), error=None,
                              result=result)
        checkpoints.discard(job_dir)
        self._leave_trainer(job)
        self.bank.set_trainable(False, [job.key])
        self.loaded.remember(job.key, job.workload)
        log.info("job %s succeeded: %s", job.rec.id, result)

    def _leave_trainer(self, job: ActiveJob) -> None:
        self.active.pop(job.key, None)
        if job.remote is not None:
            self.on_remote(job.rec.id, None)
            shutil.rmtree(self.spool(job.rec.id), ignore_errors=True)
        if job.key in self.trainer.training:
            self.trainer.remove(job.key)

    def _drop(self, job: ActiveJob) -> None:
        try:
            self._leave_trainer(job)
        finally:
            if job.key in self.bank:
                self.bank.remove_tenant(job.key)

    def _fail(self, rec: JobRecord, e: Exception) -> None:
        reason = str(e) if isinstance(e, CotuneError) else f"{type(e).__name__}: {e}"
        for name in ("train", "eval"):  # the tenant knows its upload by its name, not by where the server keeps it
            ref = rec.spec.get(name) or {}
            f = self.store.get_file(ref["file_id"], rec.tenant_id) if ref.get("file_id") else None
            if f is not None:
                reason = reason.replace(str(self.store.file_path(f.id, f.ext)), f"uploaded file {f.filename!r}")
        reason = reason.replace(str(self.store.root), "<server>")
        if not isinstance(e, CotuneError):
            log.error("job %s failed:\n%s", rec.id, traceback.format_exc())
        self.store.update_job(rec.id, only_if=(QUEUED, RUNNING), status=FAILED, error=reason[:2000],
                              finished=time.time())  # a cancelled job stays cancelled
