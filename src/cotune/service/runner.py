"""The service's worker: ONE thread owns the shared base model and drives every job and prediction on it.

Its loop, repeated until ``stop``:

1. answer every pending prediction in one routed pass across tenants (``predictions.Predictions``) and
   decode every pending generation request in one batched loop (``generations.Generations``), so a request
   waits at most one training step;
2. apply the weights that remote workers sent (``Jobs.deliver``), then pick up newly submitted jobs, resuming each from its last checkpoint, and drop cancelled ones
   (``jobs.Jobs.sync``);
3. train one round: one mixed step of every active job, whatever its engine (``jobs.Jobs.round``).

The runner orchestrates; it dispatches no engine of its own (each job's engine lives in the trainer).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch

from cotune.errors import CotuneError
from cotune.service.admission import Admission, ModelShape, machine_memory
from cotune.service.config import ServiceConfig
from cotune.service.generations import GenerateRequest, Generations
from cotune.service.jobs import Jobs
from cotune.service.pending import Pending, RemoteViews, settle
from cotune.service.predictions import LoadedAdapters, Predictions, PredictRequest, predict_together
from cotune.service.store import JobRecord, Store
from cotune.service.workload import model_task_for

log = logging.getLogger("cotune.service")

__all__ = ["JobRunner", "predict_together"]


class JobRunner:
    """Drives all jobs and predictions on one base model in one worker thread (see the module docstring)."""

    def __init__(self, config: ServiceConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.predictions = Predictions(config, store)
        self.generations = Generations(config, store)
        self._forget: Pending[str] = Pending()  # tenant keys whose adapters were deleted
        self._deliveries: Pending[tuple[str, str, Future]] = Pending()  # remote workers' weights frames (files)
        self.remote_views = RemoteViews()
        #: told of every change instead of ``remote_views`` (the trainer process forwards them to the API)
        self.remote_sink: Any = None
        self.jobs: Jobs | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.error: str | None = None

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

    def forget(self, job: JobRecord) -> None:
        """The job's adapter is being deleted: unload it from the bank (in the worker thread, which owns it)."""
        self._forget.put(job.key)
        self._wake.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def describe(self) -> dict[str, Any]:
        return {
            "ready": self._ready.is_set(), "error": self.error,
            "active_jobs": len(self.jobs.active) if self.jobs else 0, "rounds": self.jobs.rounds if self.jobs else 0,
            "predict_passes": self.predictions.passes, "generate_passes": self.generations.passes, "engine": "tenants.MultiTenantTrainer",
            "fitters": self.config.fitters,
        }

    def check_admission(self, spec: dict[str, Any]) -> None:
        """Refuse (``CotuneError``) a job whose step cannot fit the memory budget even alone (once loaded)."""
        if self.jobs is not None:
            self.jobs.admission.refuse_alone(spec)

    def submit_predict(self, job: JobRecord, inputs: list[str], max_new_tokens: int = 16) -> Future:
        """Queue a prediction; the future resolves to one dict per input (or raises ``CotuneError``)."""
        req = PredictRequest(job, list(inputs), max_new_tokens)
        if self.error:
            settle(req.future, error=CotuneError(f"the service failed to start: {self.error}"))
            return req.future
        self.predictions.put(req)
        self._wake.set()
        return req.future

    def remote_view(self, job_id: str) -> dict[str, Any] | None:
        """What a remote-fitter job's worker may fetch now (``None``: the job is not training)."""
        return self.remote_views.get(job_id)

    def deliver_weights(self, job_id: str, path: str) -> Future:
        """Queue a worker's weights frame (a file in the job's spool, consumed); the future resolves to
        ``{"update", "step"}`` or raises ``CotuneError``."""
        fut: Future = Future()
        self._deliveries.put((job_id, path, fut))
        self._wake.set()
        return fut

    def _on_remote(self, job_id: str, fields: dict[str, Any] | None) -> None:
        if self.remote_sink is not None:  # the API process keeps the views
            self.remote_sink(job_id, fields)
            return
        self.remote_views.update(job_id, fields)

    def submit_generate(self, req: GenerateRequest) -> None:
        """Queue a generation request; it hears its events through ``req.emit`` (see ``generations``)."""
        if self.error:
            req.emit(("error", CotuneError(f"the service failed to start: {self.error}")))
            return
        self.generations.put(req)
        self._wake.set()

    # -- the worker thread -----------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load_base()
        except Exception as e:  # the HTTP side stays up and reports it (healthz, predict errors)
            self.error = f"{type(e).__name__}: {e}"
            log.error("cannot load the base model: %s", self.error)
            self.predictions.fail_pending(f"the service failed to start: {self.error}")
            self.generations.fail_pending(f"the service failed to start: {self.error}")
            return
        jobs = self.jobs
        assert jobs is not None
        self._ready.set()
        jobs.sync()
        last_sync = time.monotonic()
        while not self._stop.is_set():
            for key in self._forget.take():
                jobs.loaded.unload(key)
            for job_id, path, fut in self._deliveries.take():
                try:
                    settle(fut, jobs.deliver(job_id, path))
                except Exception as e:  # a bad frame is the worker's error, reported to it
                    settle(fut, error=e if isinstance(e, CotuneError) else CotuneError(f"{type(e).__name__}: {e}"))
            jobs.finish_delivered()  # after the answers: a final evaluation must not hold the worker's request
            self.predictions.serve()
            self.generations.serve()
            if self._wake.is_set() or time.monotonic() - last_sync > 1.0:
                self._wake.clear()
                jobs.sync()
                last_sync = time.monotonic()
            if not jobs.active:
                if not (self.predictions.pending or self.generations.pending):
                    self._wake.wait(0.5)
                continue
            if not jobs.round():  # every active job waits for its remote worker
                self._wake.wait(0.05)
        jobs.checkpoint_all()
        self.predictions.fail_pending()
        self.generations.fail_pending()

    def _load_base(self) -> None:
        from cotune.models import load_model, load_tokenizer
        from cotune.tenants import MixedBatchScheduler, MultiTenantTrainer, TenantBank

        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        model_task = model_task_for(self.config.model)
        torch.manual_seed(0)
        model = load_model(self.config.model, model_task)
        tokenizer = load_tokenizer(self.config.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        bank = TenantBank(model.eval())
        # One trainer for every job, whatever its engine: each round is one mixed step (one base forward and
        # backward for the backprop and gl jobs, shared inference forwards for the zo jobs).
        trainer = MultiTenantTrainer(bank, placement="ray" if self.config.fitters == "ray" else "inline")
        # Right padding for every task: a causal LM's positions then stay those of each row alone.
        mixer = MixedBatchScheduler(target_keys=("labels",), pad={"input_ids": int(tokenizer.pad_token_id or 0)})
        limit = self.config.memory_limit_bytes or machine_memory() // 2
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        admission = Admission(ModelShape.of(model, model_task == "causal_lm"), max(0, limit - weights))
        self.jobs = Jobs(self.config, self.store, bank, trainer, mixer, tokenizer, model_task, LoadedAdapters(bank),
                         admission)
        self.jobs.on_remote = self._on_remote
        self.predictions.jobs = self.generations.jobs = self.jobs
