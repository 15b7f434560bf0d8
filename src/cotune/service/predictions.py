"""Predictions: every pending request answered in one routed pass across tenants, and the finished adapters
kept loaded for them (least recently used unloaded first)."""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from cotune.errors import CotuneError
from cotune.service.config import ServiceConfig
from cotune.service.pending import Pending, settle
from cotune.service.store import JobRecord, Store
from cotune.service.workload import Workload

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
        self._pending: Pending[PredictRequest] = Pending()
        self.passes = 0
        #: the jobs on the loaded base (``service.jobs.Jobs``: its bank, tokenizer, loaded adapters), set by
        #: the runner once the base model is loaded; requests only queue up before that
        self.jobs: Any = None

    def put(self, req: PredictRequest) -> None:
        self._pending.put(req)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def serve(self) -> None:
        if not self._pending:
            return
        if self.config.predict_wait_s > 0:  # let concurrent requests of other tenants join this pass
            time.sleep(self.config.predict_wait_s)
        reqs = self._pending.take()
        ready: list[tuple[PredictRequest, Workload]] = []
        for r in reqs:
            try:
                wl = self.jobs.workload_for(self.store.get_job(r.job.id) or r.job)
                if not wl.predicts_labels:
                    raise CotuneError(f"job {r.job.id} trains a causal LM: generate with POST /v1/completions or "
                                      "/v1/chat/completions (model = the job id)")
                ready.append((r, wl))
            except Exception as e:
                settle(r.future, error=e if isinstance(e, CotuneError) else CotuneError(f"{type(e).__name__}: {e}"))
        if not ready:
            return
        try:
            outs = predict_together(self.jobs.bank, [(r.job.key, wl, r.inputs, r.max_new_tokens)
                                                for r, wl in ready])
        except Exception as e:
            log.error("prediction pass failed:\n%s", traceback.format_exc())
            err = e if isinstance(e, CotuneError) else CotuneError(f"prediction failed: {type(e).__name__}: {e}")
            for r, _ in ready:
                settle(r.future, error=err)
            return
        self.passes += 1
        for (r, _), out in zip(ready, outs, strict=True):
            settle(r.future, out)

    def fail_pending(self, reason: str = "the service is shutting down") -> None:
        for r in self._pending.take():
            settle(r.future, error=CotuneError(reason))


def predict_together(bank: Any, requests: list[tuple[str, Workload, list[str], int]]) -> list[list[dict[str, Any]]]:
    """Answer several tenants' classification requests in ONE routed base pass."""
    from cotune.tenants.routing import RowGroups

    ids = [key for key, _, inputs, _ in requests for _ in inputs]
    texts = [t for _, _, inputs, _ in requests for t in inputs]
    enc = requests[0][1].encode_for_predict(texts, max(wl.max_length for _, wl, _, _ in requests))
    groups = RowGroups.from_ids(ids)
    with torch.no_grad():
        output = bank.forward(groups, **enc)
    per_key = {key: bank.logits(output, groups, key) for key in dict.fromkeys(ids)}
    cursor = dict.fromkeys(per_key, 0)
    outs = []
    for key, wl, inputs, _ in requests:  # a tenant's rows come back in row order: each takes its own next rows
        outs.append(wl.decode_logits(per_key[key][cursor[key] : cursor[key] + len(inputs)]))
        cursor[key] += len(inputs)
    return outs
