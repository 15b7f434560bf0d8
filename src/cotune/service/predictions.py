"""Predictions: every pending request answered in one routed pass across tenants, and the finished adapters
kept loaded for them (least recently used unloaded first)."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cotune.errors import CotuneError
from cotune.service.config import ServiceConfig
from cotune.service.store import SUCCEEDED, JobRecord, Store
from cotune.service.workload import Workload, build_workload

log = logging.getLogger("cotune.service")


@dataclass
class PredictRequest:
    job: JobRecord
    inputs: list[str]
    max_new_tokens: int
    future: Future = field(default_factory=Future)


class LoadedAdapters:
    """Finished jobs' adapters kept in the bank for predictions, least recently used unloaded first."""

    #: how many finished jobs' adapters stay loaded
    limit = 32

    def __init__(self, bank: Any) -> None:
        self.bank = bank
        self.workloads: dict[str, Workload] = {}  # tenant key -> workload, LRU order

    def remember(self, key: str, workload: Workload) -> None:
        self.workloads.pop(key, None)
        self.workloads[key] = workload
        while len(self.workloads) > self.limit:
            self.unload(next(iter(self.workloads)))

    def unload(self, key: str) -> None:
        if self.workloads.pop(key, None) is not None and key in self.bank:
            self.bank.remove_tenant(key)

    def get(self, key: str) -> Workload | None:
        wl = self.workloads.pop(key, None)
        if wl is not None:
            self.workloads[key] = wl  # most recently used
        return wl


class Predictions:
    """The queue of predict requests (filled from HTTP threads) and the pass that answers them."""

    def __init__(self, config: ServiceConfig, store: Store) -> None:
        self.config, self.store = config, store
        self._pending: list[PredictRequest] = []
        self._lock = threading.Lock()
        self.passes = 0
        #: the jobs on the loaded base (``service.jobs.Jobs``: its bank, tokenizer, loaded adapters), set by
        #: the runner once the base model is loaded; requests only queue up before that
        self.jobs: Any = None

    def put(self, req: PredictRequest) -> None:
        with self._lock:
            self._pending.append(req)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def _ensure_loaded(self, rec: JobRecord) -> Workload:
        jobs, key = self.jobs, rec.key
        if key in jobs.active:
            return jobs.active[key].workload
        wl = jobs.loaded.get(key)
        if wl is not None:
            return wl
        folder = self.store.adapter_dir(rec.id)
        if rec.status != SUCCEEDED or not folder.is_dir():
            raise CotuneError(f"job {rec.id} has no adapter yet (status {rec.status})")
        wl = build_workload(rec.spec, None, jobs.tokenizer, jobs.bank.model, jobs.model_task,
                            self.store.job_dir(rec.id))
        jobs.bank.add_tenant(key, Path(folder))
        jobs.loaded.remember(key, wl)
        return wl

    def serve(self) -> None:
        if not self._pending:
            return
        if self.config.predict_wait_s > 0:  # let concurrent requests of other tenants join this pass
            time.sleep(self.config.predict_wait_s)
        with self._lock:
            reqs, self._pending = self._pending, []
        ready: list[tuple[PredictRequest, Workload]] = []
        for r in reqs:
            try:
                ready.append((r, self._ensure_loaded(self.store.get_job(r.job.id) or r.job)))
            except Exception as e:
                r.future.set_exception(e if isinstance(e, CotuneError) else CotuneError(f"{type(e).__name__}: {e}"))
        if not ready:
            return
        try:
            outs = predict_together(self.jobs.bank, [(r.job.key, wl, r.inputs, r.max_new_tokens)
                                                for r, wl in ready])
        except Exception as e:
            log.error("prediction pass failed:\n%s", traceback.format_exc())
            err = e if isinstance(e, CotuneError) else CotuneError(f"prediction failed: {type(e).__name__}: {e}")
            for r, _ in ready:
                r.future.set_exception(err)
            return
        self.passes += 1
        for (r, _), out in zip(ready, outs, strict=True):
            r.future.set_result(out)

    def fail_pending(self, reason: str = "the service is shutting down") -> None:
        with self._lock:
            reqs, self._pending = self._pending, []
        for r in reqs:
            r.future.set_exception(CotuneError(reason))


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
