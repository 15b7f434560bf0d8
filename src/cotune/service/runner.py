"""The service's training loop: every tenant's job trains on ONE shared base model, predictions are batched.

One worker thread owns the base model (wrapped in a ``TenantBank``: each job is a tenant with its own adapter
set and task head). Its loop, repeated until ``stop``:

1. serve every pending predict request in one base pass across tenants (``bank.route``: each row gets its
   own job's adapters), so a prediction waits at most one training step;
2. pick up newly submitted jobs, resuming each from its last checkpoint, and drop cancelled ones;
3. train: one step for every active job (fair share: jobs take turns, one step each per round), logging the
   loss, checkpointing every ``checkpoint_every`` steps, and finishing jobs that reached their step count.

A job's randomness is a function of (seed, step): the rows of step ``k`` and the dropout draws of step ``k``
are the same whether or not the server was killed in between, so a resumed job continues exactly where the
uninterrupted one would have been.

Failures stay inside their job: bad data, a bad method option or a NaN storm marks that job ``failed`` with
the reason, and the loop goes on with the others.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cotune.errors import CotuneError
from cotune.service import checkpoints
from cotune.service.config import ServiceConfig
from cotune.service.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, Store
from cotune.service.workload import Workload, build_workload, model_task_for

log = logging.getLogger("cotune.service")


def tenant_key(job_id: str) -> str:
    """The bank's tenant id of a job (module-dict keys may not contain dots; job ids are hex)."""
    return f"job_{job_id}"


def step_seed(seed: int, step: int) -> int:
    """The torch seed of a job's step: depends only on the job's seed and the step index."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def _optim_config(spec: dict[str, Any]) -> Any:
    from cotune.engines.base import OptimConfig

    o = spec.get("optim") or {}
    return OptimConfig(
        optimizer=o.get("optimizer", "adamw"), lr=float(o.get("lr", 1e-3)),
        weight_decay=float(o.get("weight_decay", 0.0)), momentum=float(o.get("momentum", 0.0)),
        scheduler=o.get("scheduler", "constant"), warmup_steps=int(o.get("warmup_steps", 0)),
        total_steps=int(spec["steps"]), max_grad_norm=o.get("max_grad_norm"),
    )


def tenant_state(trainer: Any, key: str) -> dict[str, Any]:
    """One tenant's optimizer/scheduler (or fitter) state from a ``MultiTenantTrainer``."""
    if hasattr(trainer, "tenant_state_dict"):
        return trainer.tenant_state_dict(key)
    return trainer.state_dict()["tenants"][key]


def load_tenant_state(trainer: Any, key: str, state: dict[str, Any]) -> None:
    """Restore what ``tenant_state`` returned (after ``trainer.add(key, ...)``)."""
    if hasattr(trainer, "load_tenant_state_dict"):
        trainer.load_tenant_state_dict(key, state)
        return
    # MultiTenantTrainer has no per-tenant loader yet: its per-tenant record holds the optimizer and
    # schedule (backprop) or the fitter that does (gl).
    job = trainer._jobs[key]
    target = job.fitter if job.fitter is not None else job
    if hasattr(target, "load_state_dict"):
        target.load_state_dict(state)
        return
    target.optimizer.load_state_dict(state["optimizer"])
    target.scheduler.load_state_dict(state["scheduler"])


@dataclass
class ActiveJob:
    rec: JobRecord
    key: str
    workload: Workload
    engine: str  # backprop | gl (multi-tenant trainer) | zo (own engine per job)
    step: int
    checkpoint_every: int
    last_loss: float | None = None
    skipped: int = 0
    solo: Any = None  # the job's own Engine when it does not train through the multi-tenant trainer (zo)


@dataclass
class PredictRequest:
    job: JobRecord
    inputs: list[str]
    max_new_tokens: int
    future: Future = field(default_factory=Future)


class JobRunner:
    """Drives all jobs and predictions on one base model in one worker thread (see the module docstring)."""

    #: how many finished jobs' adapters stay loaded for predictions (least recently used are unloaded)
    max_loaded_finished = 32

    def __init__(self, config: ServiceConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.bank: Any = None
        self.tokenizer: Any = None
        self.model_task: str | None = None
        self.active: dict[str, ActiveJob] = {}
        self.finished_loaded: dict[str, Workload] = {}  # tenant key -> workload, LRU order
        self._predicts: list[PredictRequest] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.error: str | None = None
        self.rounds = 0
        self.predict_passes = 0
        self.engine_kind = "unknown"

    # -- public interface (called from HTTP threads) -----------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="cotune-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the current step; active jobs are checkpointed so a restart loses nothing."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """A job was submitted or cancelled: look at the store now."""
        self._wake.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def describe(self) -> dict[str, Any]:
        return {
            "ready": self._ready.is_set(), "error": self.error, "active_jobs": len(self.active),
            "rounds": self.rounds, "predict_passes": self.predict_passes, "engine": self.engine_kind,
            "fitters": self.config.fitters,
        }

    def submit_predict(self, job: JobRecord, inputs: list[str], max_new_tokens: int = 16) -> Future:
        """Queue a prediction; the future resolves to one dict per input (or raises ``CotuneError``)."""
        req = PredictRequest(job, list(inputs), max_new_tokens)
        if self.error:
            req.future.set_exception(CotuneError(f"the service failed to start: {self.error}"))
            return req.future
        with self._lock:
            self._predicts.append(req)
        self._wake.set()
        return req.future

    # -- the worker thread -----------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load_base()
        except Exception as e:  # the HTTP side stays up and reports it (healthz, predict errors)
            self.error = f"{type(e).__name__}: {e}"
            log.error("cannot load the base model: %s", self.error)
            self._fail_pending_predicts()
            return
        self._ready.set()
        self._sync_jobs()
        last_sync = time.monotonic()
        while not self._stop.is_set():
            self._serve_predictions()
            if self._wake.is_set() or time.monotonic() - last_sync > 1.0:
                self._wake.clear()
                self._sync_jobs()
                last_sync = time.monotonic()
            if not self.active:
                if not self._predicts:
                    self._wake.wait(0.5)
                continue
            self._train_round()
        for job in list(self.active.values()):  # graceful stop: checkpoint every job where it is
            self._guard(job, self._checkpoint, job)
        self._fail_pending_predicts()

    def _load_base(self) -> None:
        from cotune.models import load_model, load_tokenizer
        from cotune.tenants import TenantBank
        from cotune.tenants.engine import MultiTenantTrainer
        from cotune.tenants.scheduler import MixedBatchScheduler

        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.model_task = model_task_for(self.config.model)
        torch.manual_seed(0)
        model = load_model(self.config.model, self.model_task)
        self.tokenizer = load_tokenizer(self.config.model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.bank = TenantBank(model.eval())
        # One trainer per engine, both made before any tenant joins (a gl trainer freezes the tenants it
        # sees at construction). Each runs ONE base forward/backward per round for all of its jobs.
        placement = "ray" if self.config.fitters == "ray" else "inline"
        self.trainers = {"backprop": MultiTenantTrainer(self.bank, "backprop"),
                         "gl": MultiTenantTrainer(self.bank, "gl", placement=placement)}
        side = "left" if self.model_task == "causal_lm" else "right"
        pad = {"input_ids": int(self.tokenizer.pad_token_id or 0)}
        self.mixer = MixedBatchScheduler(target_keys=("labels",), pad=pad, padding_side=side)
        self.engine_kind = "tenants.MultiTenantTrainer"

    # -- jobs --------------------------------------------------------------------------------------------------
    def _sync_jobs(self) -> None:
        for job in list(self.active.values()):
            rec = self.store.get_job(job.rec.id)
            if rec is None or rec.status == CANCELLED:
                self._drop(job)
                checkpoints.discard(self.store.job_dir(job.rec.id))
        for rec in self.store.list_jobs(statuses=(QUEUED, RUNNING)):
            if tenant_key(rec.id) not in self.active:
                self._start_job(rec)

    def _start_job(self, rec: JobRecord) -> None:
        """Add the job to the bank and its trainer, from its last checkpoint when it has one."""
        key = tenant_key(rec.id)
        engine = rec.spec.get("engine", "backprop")
        try:
            self._unload_finished(key)
            job_dir = self.store.job_dir(rec.id)
            workload = build_workload(rec.spec, self._data_refs(rec), self.tokenizer, self.bank.model,
                                      self.model_task, job_dir)
            torch.manual_seed(step_seed(int(rec.spec.get("seed", 0)), -1))  # the initial weights follow the seed
            self.bank.add_tenant(key, workload.adapter_configs, head=workload.head)
            solo = None
            try:
                step, trainer_state = 0, None
                ckpt = checkpoints.latest(job_dir)
                if ckpt is not None:
                    state, trainer_state = checkpoints.load(ckpt, self.bank.model, key)
                    step = int(state["step"])
                optim = _optim_config(rec.spec)
                if engine in self.trainers:
                    if rec.spec.get("engine_options"):
                        raise CotuneError(f"engine_options are not supported for {engine!r} service jobs yet")
                    self.trainers[engine].add(key, optim, loss_fn=workload.tenant_loss)
                    if trainer_state is not None:
                        load_tenant_state(self.trainers[engine], key, trainer_state)
                else:
                    solo = self._solo_engine(rec, key, optim)
                    if trainer_state is not None:
                        solo.load_state_dict(trainer_state)
            except Exception:
                if engine in self.trainers and key in self.trainers[engine].training:
                    self.trainers[engine].remove(key)
                self.bank.remove_tenant(key)
                raise
        except Exception as e:
            self._fail(rec, e)
            return
        every = rec.spec.get("checkpoint_every") or self.config.checkpoint_every
        self.active[key] = ActiveJob(rec, key, workload, engine, step, every, solo=solo)
        fields: dict[str, Any] = {"status": RUNNING, "step": step}
        if rec.started is None:
            fields["started"] = time.time()
        if step > 0:
            fields["resumed_from"] = step
            self.store.truncate_metrics(rec.id, step)  # those steps are repeated from the checkpoint
        self.store.update_job(rec.id, **fields)
        log.info("job %s %s at step %d/%d", rec.id, "resumed" if step else "started", step, rec.total_steps)

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

    def _solo_engine(self, rec: JobRecord, key: str, optim: Any) -> Any:
        """An engine of its own for a job whose engine the multi-tenant trainer does not run (zo)."""
        from cotune.adapters.attach import set_active
        from cotune.engines.base import make_engine

        set_active(self.bank.model, key)
        try:
            options = dict(rec.spec.get("engine_options") or {})
            if rec.spec["engine"] == "zo":
                options.setdefault("seed", int(rec.spec.get("seed", 0)))  # reproducible directions per job
            return make_engine(rec.spec["engine"], self.bank.model, optim, **options)
        except ModuleNotFoundError as e:
            raise CotuneError(f"engine {rec.spec['engine']!r} is not available in this installation ({e})") from e
        finally:
            set_active(self.bank.model, None)

    def _train_round(self) -> None:
        """One step for every active job: one mixed base pass per multi-tenant engine, solo jobs alone."""
        self.rounds += 1
        by_engine: dict[str, list[ActiveJob]] = {}
        for job in self.active.values():
            by_engine.setdefault(job.engine if job.engine in self.trainers else "solo", []).append(job)
        for engine, jobs in by_engine.items():
            if self._stop.is_set():
                return
            self._serve_predictions()  # a prediction never waits more than one pass
            if engine == "solo":
                for job in jobs:
                    self._guard(job, self._solo_step, job)
            else:
                self._mixed_step(engine, jobs)

    def _mixed_step(self, engine: str, jobs: list[ActiveJob]) -> None:
        parts = []
        for job in jobs:
            try:
                parts.append((job.key, job.workload.batch(job.step)))
            except Exception as e:  # this job's data is bad: it fails, the others train
                self._drop(job)
                self._fail(job.rec, e)
        if not parts:
            return
        model = self.bank.model
        # The base's dropout draws depend only on the (seed, step) of the jobs in the batch: a lone job's
        # step is the same computation after a restart as it would have been without one.
        mix = 0
        for job in sorted(jobs, key=lambda j: j.key):
            mix = (mix * 1_000_003 + step_seed(int(job.rec.spec.get("seed", 0)), job.step)) % (2**63 - 1)
        torch.manual_seed(mix)
        model.train()
        try:
            results = self.trainers[engine].step(self.mixer.collate(parts))
        except Exception as e:
            model.eval()
            if len(parts) == 1:
                job = self.active[parts[0][0]]
                self._drop(job)
                self._fail(job.rec, e)
                return
            # Find the culprit: step each job alone (a job's bad rows must not stop the others).
            for key, batch in parts:
                job = self.active[key]
                self._guard(job, self._one_alone, engine, job, batch)
            return
        finally:
            model.eval()
        for key, r in results.items():
            self._guard(self.active[key], self._after_step, self.active[key], r)

    def _one_alone(self, engine: str, job: ActiveJob, batch: Any) -> None:
        self.bank.model.train()
        try:
            r = self.trainers[engine].step(self.mixer.collate([(job.key, batch)]))
        finally:
            self.bank.model.eval()
        self._after_step(job, r[job.key])

    def _solo_step(self, job: ActiveJob) -> None:
        from cotune.adapters.attach import set_active

        model = self.bank.model
        batch = job.workload.batch(job.step)
        set_active(model, job.key)
        torch.manual_seed(step_seed(int(job.rec.spec.get("seed", 0)), job.step))
        model.train()
        try:
            r = job.solo.step(lambda m, b: job.workload.loss(m, b), batch)
        finally:
            model.eval()
            set_active(model, None)
        self._after_step(job, r)

    def _after_step(self, job: ActiveJob, r: Any) -> None:
        job.step += 1
        job.last_loss = float(r.loss)
        job.skipped += int(bool(r.skipped))
        values = {"loss": job.last_loss}
        values.update({k: float(v) for k, v in (r.stats or {}).items() if isinstance(v, int | float)})
        self.store.add_metrics(job.rec.id, job.step, values)
        self.store.update_job(job.rec.id, step=job.step)
        if job.skipped > max(10, job.rec.total_steps // 2):
            reason = getattr(r, "reason", None) or "non-finite loss or gradient"
            raise CotuneError(f"{job.skipped} of {job.step} steps were skipped (last: {reason}); lower the lr "
                              "or check the data")
        if job.step >= job.rec.total_steps:
            self._finish(job)
        elif job.step % job.checkpoint_every == 0:
            self._checkpoint(job)

    def _guard(self, job: ActiveJob, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            self._drop(job)
            self._fail(job.rec, e)

    def _trainer_state(self, job: ActiveJob) -> dict[str, Any]:
        return job.solo.state_dict() if job.solo is not None else tenant_state(self.trainers[job.engine], job.key)

    def _checkpoint(self, job: ActiveJob) -> None:
        state = {"step": job.step, "loss": job.last_loss, "time": time.time()}
        checkpoints.save(self.store.job_dir(job.rec.id), self.bank.model, job.key, self._trainer_state(job), state)
        self.store.update_job(job.rec.id, checkpoint_step=job.step)

    def _finish(self, job: ActiveJob) -> None:
        from cotune.adapters.attach import set_active

        result: dict[str, Any] = {"train_loss": job.last_loss, "skipped_steps": job.skipped}
        if job.workload.has_eval:
            set_active(self.bank.model, job.key)
            try:
                metrics = job.workload.evaluate(self.bank.model)
            finally:
                set_active(self.bank.model, None)
            result["eval"] = metrics
            self.store.add_metrics(job.rec.id, job.step, {f"eval_{k}": v for k, v in metrics.items()
                                                         if isinstance(v, int | float)})
        job_dir = self.store.job_dir(job.rec.id)
        tmp, final = job_dir / ".adapter.tmp", self.store.adapter_dir(job.rec.id)
        shutil.rmtree(tmp, ignore_errors=True)
        self.bank.save_tenant(job.key, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.store.update_job(job.rec.id, status=SUCCEEDED, step=job.step, finished=time.time(), result=result)
        checkpoints.discard(job_dir)
        self._leave_trainer(job)
        self.bank.set_trainable(False, [job.key])
        self._remember_finished(job.key, job.workload)
        log.info("job %s succeeded: %s", job.rec.id, result)

    def _leave_trainer(self, job: ActiveJob) -> None:
        self.active.pop(job.key, None)
        if job.solo is not None:
            job.solo.close()
        elif job.key in self.trainers[job.engine].training:
            self.trainers[job.engine].remove(job.key)

    def _drop(self, job: ActiveJob) -> None:
        try:
            self._leave_trainer(job)
        finally:
            if job.key in self.bank:
                self.bank.remove_tenant(job.key)

    def _fail(self, rec: JobRecord, e: Exception) -> None:
        reason = str(e) if isinstance(e, CotuneError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, CotuneError):
            log.error("job %s failed:\n%s", rec.id, traceback.format_exc())
        self.store.update_job(rec.id, status=FAILED, error=reason[:2000], finished=time.time())

    # -- finished adapters kept loaded for predictions -----------------------------------------------------
    def _remember_finished(self, key: str, workload: Workload) -> None:
        self.finished_loaded.pop(key, None)
        self.finished_loaded[key] = workload
        while len(self.finished_loaded) > self.max_loaded_finished:
            old = next(iter(self.finished_loaded))
            self._unload_finished(old)

    def _unload_finished(self, key: str) -> None:
        if self.finished_loaded.pop(key, None) is not None and key in self.bank:
            self.bank.remove_tenant(key)

    def _ensure_loaded(self, rec: JobRecord) -> Workload:
        key = tenant_key(rec.id)
        if key in self.active:
            return self.active[key].workload
        if key in self.finished_loaded:
            wl = self.finished_loaded.pop(key)
            self.finished_loaded[key] = wl  # most recently used
            return wl
        folder = self.store.adapter_dir(rec.id)
        if rec.status != SUCCEEDED or not folder.is_dir():
            raise CotuneError(f"job {rec.id} has no adapter yet (status {rec.status})")
        wl = build_workload(rec.spec, None, self.tokenizer, self.bank.model, self.model_task,
                            self.store.job_dir(rec.id))
        self.bank.add_tenant(key, Path(folder))
        self._remember_finished(key, wl)
        return wl

    # -- predictions ----------------------------------------------------------------------------------------
    def _serve_predictions(self) -> None:
        if not self._predicts:
            return
        if self.config.predict_wait_s > 0:  # let concurrent requests of other tenants join this pass
            time.sleep(self.config.predict_wait_s)
        with self._lock:
            reqs, self._predicts = self._predicts, []
        ready: list[tuple[PredictRequest, Workload]] = []
        for r in reqs:
            try:
                ready.append((r, self._ensure_loaded(self.store.get_job(r.job.id) or r.job)))
            except Exception as e:
                r.future.set_exception(e if isinstance(e, CotuneError) else CotuneError(f"{type(e).__name__}: {e}"))
        if not ready:
            return
        try:
            outs = predict_together(self.bank, [(tenant_key(r.job.id), wl, r.inputs, r.max_new_tokens)
                                                for r, wl in ready])
        except Exception as e:
            log.error("prediction pass failed:\n%s", traceback.format_exc())
            err = e if isinstance(e, CotuneError) else CotuneError(f"prediction failed: {type(e).__name__}: {e}")
            for r, _ in ready:
                r.future.set_exception(err)
            return
        self.predict_passes += 1
        for (r, _), out in zip(ready, outs, strict=True):
            r.future.set_result(out)

    def _fail_pending_predicts(self) -> None:
        with self._lock:
            reqs, self._predicts = self._predicts, []
        for r in reqs:
            r.future.set_exception(CotuneError("the service is shutting down"))


def predict_together(bank: Any, requests: list[tuple[str, Workload, list[str], int]]) -> list[list[dict[str, Any]]]:
    """Answer several tenants' requests; classification rows of all tenants share ONE routed base pass."""
    outs: list[list[dict[str, Any]] | None] = [None] * len(requests)
    cls = [i for i, (_, wl, _, _) in enumerate(requests) if wl.predicts_labels]
    if cls:
        from cotune.tenants.routing import RowGroups

        ids = [requests[i][0] for i in cls for _ in requests[i][2]]
        texts = [t for i in cls for t in requests[i][2]]
        wl0 = requests[cls[0]][1]
        enc = wl0.encode_for_predict(texts, max(requests[i][1].max_length for i in cls))
        groups = RowGroups.from_ids(ids)
        with torch.no_grad():
            output = bank.forward(groups, **enc)
        per_key = {key: bank.logits(output, groups, key) for key in dict.fromkeys(requests[i][0] for i in cls)}
        cursor = dict.fromkeys(per_key, 0)
        for i in cls:  # a tenant's rows come back in row order: each request takes its own next rows
            key, wl, inputs, _ = requests[i]
            outs[i] = wl.decode_logits(per_key[key][cursor[key] : cursor[key] + len(inputs)])
            cursor[key] += len(inputs)
    for i, (key, wl, inputs, max_new) in enumerate(requests):
        if outs[i] is None:  # generation: one routed pass per request (each row still uses its own adapters)
            outs[i] = wl.generate(bank, key, inputs, max_new)
    return outs  # type: ignore[return-value]
