"""Training many tenants with one base forward/backward per mixed batch (DESIGN §3, §4).

Loss normalisation (what makes a tenant's trajectory in a mixed run equal its trajectory alone): each
tenant's loss is the mean over ITS rows, and the batch objective is the SUM over tenants. Tenant ``k``'s
parameters only reach its own rows, so ``∂(Σ_j L_j)/∂w_k = ∂L_k/∂w_k``: exactly the gradient it would
get trained alone on the same rows. Each tenant has its own optimizer and schedule.

Engines:

* ``backprop`` — the baseline: the tenants' parameters require grad, one backward fills every tenant's
  ``.grad``, each tenant's optimizer steps.
* ``gl`` — gradient learning (ColA): the server's adapters are read-only (no grads, no optimizer state);
  every site's ``(u, δ)`` is captured already split by tenant (the router taps each tenant's rows
  separately) and shipped to that tenant's fitter, which owns a copy of the tenant's adapters and its
  optimizer and takes one step of ``½‖g(u;w) − sg(g(u;w_t) − s·δ)‖²``; the new weights are copied back
  to the server. ``merged=True``: ColA's collaborative merged mode — all rows run through
  ``W + mean_k ΔW_k`` of the batch's tenants at mergeable sites (each tenant still fits its own adapter
  from its own rows' ``(u, δ)``). Off by default.

One tenant's NaN/inf loss or gradient, or an exception in its loss or its fitter, skips that tenant's
update only (counted in ``skipped``); rows never mix, so the other tenants' updates are unchanged.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cotune.adapters.attach import sites
from cotune.adapters.base import Adapter
from cotune.adapters.site import AdaptedModule
from cotune.engines.base import OptimConfig, make_optimizer, make_scheduler
from cotune.engines.update import apply_update
from cotune.errors import CotuneError
from cotune.tenants.bank import TenantBank
from cotune.tenants.fitting import Record, TenantFitter
from cotune.tenants.scheduler import Batch, MixedBatch

#: ``loss_fn(logits of the tenant's rows cut to its head width, its targets) -> mean loss over its rows``
TenantLoss = Callable[[torch.Tensor, Batch], torch.Tensor]


def classification_loss(logits: torch.Tensor, targets: Batch) -> torch.Tensor:
    """Cross-entropy (mean over rows); one output means regression (MSE), as in transformers."""
    labels = targets["labels"].to(logits.device)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def causal_lm_loss(logits: torch.Tensor, targets: Batch) -> torch.Tensor:
    """Next-token cross-entropy, mean over the tenant's target tokens (``-100`` ignored)."""
    labels = targets["labels"].to(logits.device)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(), ignore_index=-100)


def default_loss(logits: torch.Tensor, targets: Batch) -> torch.Tensor:
    """``causal_lm_loss`` for per-token logits, ``classification_loss`` otherwise."""
    return causal_lm_loss(logits, targets) if logits.dim() == 3 else classification_loss(logits, targets)


@dataclass
class TenantStep:
    """What one mixed step did for one tenant."""

    loss: float
    updated: bool
    skipped: bool = False
    reason: str | None = None
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Job:
    optim: OptimConfig
    loss_fn: TenantLoss
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    fitter: TenantFitter | None = None


class MultiTenantTrainer:
    """Trains every tenant of a ``TenantBank`` from mixed batches (``engine``: ``backprop`` | ``gl``).

    ``placement`` (gl): where each tenant's fitter runs — ``inline`` (in turn, in this thread),
    ``thread`` (one thread per tenant, all fitting at once), ``process`` (a worker process per tenant) or
    ``ray`` (an actor per tenant); ``fitter_options`` go to the fitter (``wire_dtype="bf16"``,
    ``sufficient_statistic``, ``timeout_s``, ...). ``gather``: override the bank's gathered-matmul setting.
    ``micro_rows``: cap on the rows of one server forward/backward; a mixed batch is cut into chunks of
    whole tenants (gradients accumulate, each tenant still takes ONE step per batch) — this bounds the
    server's activation memory near one job's, at the price of smaller matmuls. ``None``: one pass.
    """

    def __init__(
        self,
        bank: TenantBank,
        engine: str = "backprop",
        merged: bool = False,
        placement: str = "inline",
        gather: bool | None = None,
        micro_rows: int | None = None,
        **fitter_options: Any,
    ) -> None:
        if engine not in ("backprop", "gl"):
            raise CotuneError(f"unknown multi-tenant engine {engine!r}; valid: backprop, gl")
        if merged and engine != "gl":
            raise CotuneError("collaborative merged mode is a gradient-learning option: use engine='gl'")
        self.bank = bank
        self.engine = engine
        self.merged = merged
        self.placement = placement
        self.gather = gather
        self.fitter_options = fitter_options
        if micro_rows is not None and micro_rows < 1:
            raise CotuneError(f"micro_rows must be >= 1, got {micro_rows}")
        self.micro_rows = micro_rows
        self._jobs: dict[str, _Job] = {}
        self.skipped: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        if engine == "gl":
            bank.set_trainable(False)

    # -- membership ----------------------------------------------------------------------------------
    def add(self, tenant_id: str, optim: OptimConfig | None = None, loss_fn: TenantLoss | None = None) -> None:
        """Start training tenant ``tenant_id`` (already in the bank) with its own optimizer and loss."""
        self.bank.tenant(tenant_id)
        if tenant_id in self._jobs:
            raise CotuneError(f"tenant {tenant_id!r} is already being trained")
        job = _Job(optim or OptimConfig(), loss_fn or default_loss)
        if self.engine == "backprop":
            self.bank.set_trainable(True, [tenant_id])
            named = list(self.bank.parameters(tenant_id).items())
            job.optimizer = make_optimizer(named, job.optim)
            job.scheduler = make_scheduler(job.optimizer, job.optim)
        else:
            self.bank.set_trainable(False, [tenant_id])
            job.fitter = TenantFitter(
                tenant_id, self.bank.adapters(tenant_id), job.optim, self.placement, **self.fitter_options
            )
        self._jobs[tenant_id] = job

    def remove(self, tenant_id: str) -> None:
        """Stop training the tenant (its weights stay in the bank)."""
        job = self._jobs.pop(tenant_id, None)
        if job is None:
            raise CotuneError(f"tenant {tenant_id!r} is not being trained; training: {sorted(self._jobs)}")
        if job.fitter is not None:
            job.fitter.close()
        self.bank.set_trainable(False, [tenant_id])

    @property
    def training(self) -> list[str]:
        return list(self._jobs)

    # -- one step ------------------------------------------------------------------------------------
    def step(self, batch: MixedBatch) -> dict[str, TenantStep]:
        """One base forward/backward for the whole mixed batch; then each tenant's own update."""
        missing = [t for t in batch.tenants if t not in self._jobs]
        if missing:
            raise CotuneError(f"batch has rows of tenant(s) {missing} that are not being trained; add() them")
        result = self._step_backprop(batch) if self.engine == "backprop" else self._step_gl(batch)
        for t, r in result.items():
            self.steps[t] += 1
            if r.skipped:
                self.skipped[t] += 1
        return result

    def _losses(self, out: Any, batch: MixedBatch) -> tuple[dict[str, torch.Tensor], dict[str, TenantStep]]:
        """Each tenant's mean loss over its rows; failed or non-finite ones come back as skipped steps."""
        losses: dict[str, torch.Tensor] = {}
        failed: dict[str, TenantStep] = {}
        for t in batch.tenants:
            try:
                loss = self._jobs[t].loss_fn(self.bank.logits(out, batch.groups, t), batch.targets[t])
            except Exception as e:  # one tenant's bad data must not stop the others
                failed[t] = TenantStep(math.nan, False, True, f"loss failed: {type(e).__name__}: {e}")
                continue
            if not bool(torch.isfinite(loss.detach())):
                failed[t] = TenantStep(float(loss.detach()), False, True, "non-finite loss")
                continue
            losses[t] = loss
        return losses, failed

    def _merged_deltas(self, batch: MixedBatch) -> tuple[dict[str, torch.Tensor], dict[str, set[str]]]:
        """``mean_k ΔW_k`` per site over the batch's tenants whose adapter there merges into a Linear."""
        deltas: dict[str, torch.Tensor] = {}
        covered: dict[str, set[str]] = {}
        for path, site in sites(self.bank.model).items():
            ads = {t: site.adapters[t] for t in batch.tenants if t in site.adapters}
            ok = {t: ad for t, ad in ads.items() if ad.site == "parallel" and ad.delta_weight() is not None}
            if not ok or not isinstance(site.base, torch.nn.Linear):
                continue
            with torch.no_grad():
                deltas[path] = torch.stack([ad.delta_weight().float() for ad in ok.values()]).mean(0)
            covered[path] = set(ok)
        return deltas, covered

    def _chunks(self, batch: MixedBatch) -> list[MixedBatch]:
        return batch.split(self.micro_rows) if self.micro_rows else [batch]

    def _step_backprop(self, batch: MixedBatch) -> dict[str, TenantStep]:
        for t in batch.tenants:
            self._jobs[t].optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        result: dict[str, TenantStep] = {}
        losses: dict[str, torch.Tensor] = {}
        for chunk in self._chunks(batch):  # tenants never straddle chunks: each .grad is complete
            with torch.enable_grad(), self.bank.route(chunk.groups, gather=self.gather):
                out = self.bank.model(**chunk.inputs)
            chunk_losses, failed = self._losses(out, chunk)
            result.update(failed)
            if chunk_losses:
                torch.stack(list(chunk_losses.values())).sum().backward()
            losses.update({t: v.detach() for t, v in chunk_losses.items()})
            del out, chunk_losses
        for t, loss in losses.items():
            job = self._jobs[t]
            # the engines' shared update: same clipping and NaN/inf skip as single-tenant training
            ok, norm = apply_update(
                list(self.bank.parameters(t).values()), job.optimizer, job.scheduler, job.optim.max_grad_norm
            )
            reason = None if ok else f"non-finite gradient (norm {norm})"
            result[t] = TenantStep(float(loss), ok, not ok, reason, {"grad_norm": norm})
        return result

    def _step_gl(self, batch: MixedBatch) -> dict[str, TenantStep]:
        merged, covered = self._merged_deltas(batch) if self.merged else ({}, {})
        result: dict[str, TenantStep] = {}
        submitted: dict[str, float] = {}
        for chunk in self._chunks(batch):
            capture = TenantCapture(self.bank)
            with torch.enable_grad(), capture, self.bank.route(chunk.groups, gather=self.gather, merged=merged) as r:
                r.merged_tenants = covered
                out = self.bank.model(**chunk.inputs)
            losses, failed = self._losses(out, chunk)
            result.update(failed)
            records = capture.deltas(losses)
            del out, capture
            for t, loss in losses.items():  # ship every tenant's pairs first: thread/process fitters run at once
                recs = records.pop(t, [])
                if not all(bool(torch.isfinite(d).all()) for _, _, d, _, _ in recs):
                    result[t] = TenantStep(float(loss.detach()), False, True, "non-finite δ")
                    continue
                try:
                    self._jobs[t].fitter.submit(recs)  # type: ignore[union-attr]
                    submitted[t] = float(loss.detach())
                except Exception as e:  # one tenant's fitter failing is that tenant's skipped step
                    result[t] = TenantStep(float(loss.detach()), False, True, f"fitter failed: {e}")
        for t, value in submitted.items():
            try:
                ok, reason, stats = self._jobs[t].fitter.step()  # type: ignore[union-attr]
            except Exception as e:
                ok, reason, stats = False, f"fitter failed: {e}", {}
            result[t] = TenantStep(value, ok, not ok, reason, stats)
        return result

    def close(self) -> None:
        """Stop the tenants' fitters (threads, processes, actors); idempotent."""
        for job in self._jobs.values():
            if job.fitter is not None:
                job.fitter.close()

    def state_dict(self) -> dict[str, Any]:
        """Per-tenant optimizer/scheduler (or fitter) state and the skip counters."""
        out: dict[str, Any] = {"skipped": dict(self.skipped), "steps": dict(self.steps), "tenants": {}}
        for t, job in self._jobs.items():
            if job.fitter is not None:
                out["tenants"][t] = job.fitter.state_dict()
            else:
                out["tenants"][t] = {"optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict()}  # type: ignore[union-attr]
        return out


class TenantCapture:
    """Server-side capture of ``(u, h)`` per site and tenant during a routed forward (gradient learning).

    Installed as every site's ``tap`` (the previous taps are restored on exit). ``deltas(losses)`` then
    runs ONE backward of ``Σ_k L_k`` to the captured ``h`` tensors (``torch.autograd.grad``: nothing
    accumulates in any ``.grad``) and returns ``{tenant: [(site path, u, δ, seed)]}``.
    """

    def __init__(self, bank: TenantBank) -> None:
        self.bank = bank
        self._owner: dict[int, str] = {}
        self.items: list[tuple[str, str, torch.Tensor, torch.Tensor, int | None, bool]] = []
        self._saved: list[tuple[AdaptedModule, Any]] = []

    def __enter__(self) -> TenantCapture:
        for t in self.bank.tenants:
            for ad in self.bank.adapters(t).values():
                self._owner[id(ad)] = t
        for s in sites(self.bank.model).values():
            self._saved.append((s, s.tap))
            s.tap = self._tap
        return self

    def __exit__(self, *exc: object) -> None:
        for s, tap in self._saved:
            s.tap = tap
        self._saved.clear()

    def _tap(
        self, site: AdaptedModule, ad: Adapter, u: torch.Tensor, h: torch.Tensor, seed: int | None
    ) -> torch.Tensor:
        t = self._owner.get(id(ad))
        if t is None:  # not a tenant adapter (a plain cotune set): leave it alone
            return h
        if not h.requires_grad:  # nothing upstream is trainable: h starts the graph δ is taken on
            h = h.detach().requires_grad_(True)
        self.items.append((t, site.path, u.detach(), h, seed, ad.training))
        return h

    def deltas(self, losses: dict[str, torch.Tensor]) -> dict[str, list[Record]]:
        """δ = ∂(Σ_k L_k)/∂h at every captured call, grouped by tenant (tenants with a loss only).

        A site whose ``h`` does not reach the loss gets no record (its gradient is zero, as in backprop).
        """
        items = [it for it in self.items if it[0] in losses]
        if not items:
            return {}
        total = torch.stack(list(losses.values())).sum()
        grads = torch.autograd.grad(total, [it[3] for it in items], allow_unused=True)
        out: dict[str, list[Record]] = {}
        for (t, path, u, _h, seed, training), d in zip(items, grads, strict=True):
            if d is not None:
                out.setdefault(t, []).append((path, u, d.detach(), seed, training))
        return out
