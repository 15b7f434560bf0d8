"""Training many tenants from mixed batches: each tenant's own engine, one base pass for all of them.

Every tenant is trained by an ordinary engine of the registry (``make_engine``: backprop, gl, zo, or one
added later) bound to the tenant's adapter set, with its own optimizer, schedule, options and loss. A
mixed batch is one step of ``cotune.engines.step`` for all of them: the gradient engines' tenants share ONE
routed forward and ONE backward (each tenant's loss is the mean over ITS rows and the objective is the sum
over tenants, so ``∂(Σ_j L_j)/∂w_k = ∂L_k/∂w_k``: exactly its gradient alone), the forward-only engines'
tenants share their inference forwards. A single job is this with one tenant.

``merged=True`` is ColA's collaborative merged mode (gradient learning only): at every site where the
batch's tenants have mergeable adapters, all rows run through ``W + mean_k ΔW_k`` and each tenant learns its
own adapter from ``(u, δ)`` of its own rows, where ``δ`` is the gradient at the merged output.

One tenant's failing or non-finite loss, its non-finite gradient or its failing fitter skips that tenant's
update only (counted in ``skipped``, with the reason); rows never mix, so the others' updates are unchanged.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cotune.adapters.attach import sites
from cotune.engines.base import ENGINES, Engine, OptimConfig, StepResult, make_engine
from cotune.engines.gradient_learning.capture import refuse_stochastic_merge
from cotune.engines.step import Losses, forward_step, gradient_step
from cotune.engines.update import check_loss
from cotune.errors import CotuneError
from cotune.tasks.losses import output_loss
from cotune.tenants.bank import TenantBank
from cotune.tenants.scheduler import Batch, MixedBatch

#: ``loss_fn(logits of the tenant's rows cut to its head width, its targets) -> mean loss over its rows``
TenantLoss = Callable[[torch.Tensor, Batch], torch.Tensor]


@dataclass
class _Member:
    engine: Engine
    loss_fn: TenantLoss


class MultiTenantTrainer:
    """Trains tenants of a ``TenantBank`` from mixed batches, each with its own engine.

    ``engine`` and the options are the defaults of ``add``: ``placement`` (gl: where each tenant's fitter
    runs — ``inline``, ``thread``, ``process`` or ``ray``) and ``fitter_options`` (gl: ``wire_dtype``,
    ``sufficient_statistic``, ``timeout_s``, ...). ``gather``: override the bank's gathered-matmul setting.
    ``micro_rows``: cap on the rows of one server forward/backward; the batch is cut into chunks of whole
    tenants (each tenant still takes ONE step per batch) — this bounds the server's activation memory near
    one job's, at the price of smaller matmuls. ``None``: one pass.
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
        if engine not in ENGINES:  # add() would say so too; a bad default is refused here, before any tenant
            raise CotuneError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
        if merged and engine != "gl":
            raise CotuneError("collaborative merged mode is a gradient-learning option: use engine='gl'")
        if micro_rows is not None and micro_rows < 1:
            raise CotuneError(f"micro_rows must be >= 1, got {micro_rows}")
        self.bank = bank
        self.engine = engine
        self.merged = merged
        self.gl_options = {"placement": placement, **fitter_options}
        self.gather = gather
        self.micro_rows = micro_rows
        self._members: dict[str, _Member] = {}
        self.skipped: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()

    # -- membership ----------------------------------------------------------------------------------
    def add(
        self,
        tenant_id: str,
        optim: OptimConfig | None = None,
        loss_fn: TenantLoss | None = None,
        engine: str | None = None,
        **options: Any,
    ) -> None:
        """Start training tenant ``tenant_id`` (already in the bank) with engine ``engine`` and ``options``."""
        self.bank.tenant(tenant_id)
        if tenant_id in self._members:
            raise CotuneError(f"tenant {tenant_id!r} is already being trained")
        engine = engine or self.engine
        if self.merged and engine != "gl":
            raise CotuneError("this trainer runs collaborative merged mode: every tenant must use engine='gl'")
        opts = {**(self.gl_options if engine == "gl" else {}), **options}
        try:
            built = make_engine(engine, self.bank.model, optim or OptimConfig(), name=tenant_id, **opts)
        except TypeError as e:  # an option this engine does not take
            raise CotuneError(f"engine {engine!r}: {e}") from e
        self._members[tenant_id] = _Member(built, loss_fn or output_loss)

    def remove(self, tenant_id: str) -> None:
        """Stop training the tenant (its weights stay in the bank, read-only)."""
        member = self._members.pop(tenant_id, None)
        if member is None:
            raise CotuneError(f"tenant {tenant_id!r} is not being trained; training: {sorted(self._members)}")
        member.engine.close()
        self.bank.set_trainable(False, [tenant_id])

    @property
    def training(self) -> list[str]:
        return list(self._members)

    def engine_of(self, tenant_id: str) -> Engine:
        """The engine training ``tenant_id``."""
        if tenant_id not in self._members:
            raise CotuneError(f"tenant {tenant_id!r} is not being trained; training: {sorted(self._members)}")
        return self._members[tenant_id].engine

    # -- one step ------------------------------------------------------------------------------------
    def step(self, batch: MixedBatch) -> dict[str, StepResult]:
        """One step of every tenant in ``batch``: one routed pass per engine kind (per chunk)."""
        missing = [t for t in batch.tenants if t not in self._members]
        if missing:
            raise CotuneError(f"batch has rows of tenant(s) {missing} that are not being trained; add() them")
        kinds: dict[str, list[str]] = {}
        for t in batch.tenants:
            kinds.setdefault(self._members[t].engine.kind, []).append(t)
        result: dict[str, StepResult] = {}
        for kind, tenants in kinds.items():
            sub = batch.subset(tenants)
            if kind == "gradient":
                for chunk in sub.split(self.micro_rows) if self.micro_rows else [sub]:
                    result.update(self._gradient_pass(chunk))
            elif kind == "forward":
                result.update(self._forward_pass(sub))
            else:
                raise CotuneError(f"engine kind {kind!r} is not one the trainer can drive (gradient, forward)")
        for t, r in result.items():
            self.steps[t] += 1
            self.skipped[t] += int(r.skipped)
        return {t: result[t] for t in batch.tenants}

    def _gradient_pass(self, chunk: MixedBatch) -> dict[str, StepResult]:
        merged, covered = self._merged_deltas(chunk) if self.merged else ({}, {})

        def forward() -> Losses:
            with torch.enable_grad(), self.bank.route(chunk.groups, self.gather, merged, covered):
                out = self.bank.model(**chunk.inputs)
            return self._losses(out, chunk)

        return gradient_step(self._engines(chunk), forward, isolate=True)

    def _forward_pass(self, sub: MixedBatch) -> dict[str, StepResult]:
        def forward() -> dict[str, float]:
            with torch.inference_mode(), self.bank.route(sub.groups, gather=self.gather):
                out = self.bank.model(**sub.inputs)
                losses = self._losses(out, sub)
            return {t: math.nan if isinstance(v, Exception) else float(v) for t, v in losses.items()}

        return forward_step(self._engines(sub), forward, isolate=True)

    def _engines(self, batch: MixedBatch) -> dict[str, Engine]:
        return {t: self._members[t].engine for t in batch.tenants}

    def _losses(self, out: Any, batch: MixedBatch) -> Losses:
        """Each tenant's mean loss over its rows (or why it has none: one tenant's bad data stops no other)."""
        losses: Losses = {}
        for t in batch.tenants:
            try:
                logits = self.bank.logits(out, batch.groups, t)
                losses[t] = check_loss(self._members[t].loss_fn(logits, batch.targets[t]), f"tenant {t!r}")
            except Exception as e:
                losses[t] = e
        return losses

    def _merged_deltas(self, batch: MixedBatch) -> tuple[dict[str, torch.Tensor], dict[str, set[str]]]:
        """``mean_k ΔW_k`` per site over the batch's tenants whose adapter there merges into a Linear."""
        deltas: dict[str, torch.Tensor] = {}
        covered: dict[str, set[str]] = {}
        for path, site in sites(self.bank.model).items():
            if not isinstance(site.base, torch.nn.Linear):
                continue
            ads = {t: site.adapters[t] for t in batch.tenants if t in site.adapters}
            with torch.no_grad():  # each ΔW formed once: it is both the test of mergeability and the term
                dws = {t: ad.delta_weight() for t, ad in ads.items() if ad.site == "parallel"}  # type: ignore[operator]
            dws = {t: dw for t, dw in dws.items() if dw is not None}
            if not dws:
                continue
            for t in dws:
                refuse_stochastic_merge(path, ads[t])  # type: ignore[arg-type]
            deltas[path] = torch.stack(list(dws.values())).mean(0)
            covered[path] = set(dws)
        return deltas, covered

    # -- state ---------------------------------------------------------------------------------------
    def tenant_state_dict(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's engine state (optimizer, schedule, fitter) for its checkpoint."""
        return self.engine_of(tenant_id).state_dict()

    def load_tenant_state_dict(self, tenant_id: str, state: dict[str, Any]) -> None:
        self.engine_of(tenant_id).load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """Every tenant's engine state and the step and skip counters."""
        tenants = {t: m.engine.state_dict() for t, m in self._members.items()}
        return {"skipped": dict(self.skipped), "steps": dict(self.steps), "tenants": tenants}

    def close(self) -> None:
        """Stop the tenants' engines (fitter threads, processes, actors); idempotent."""
        for m in self._members.values():
            m.engine.close()
