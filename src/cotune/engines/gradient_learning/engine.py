"""``GradientLearningEngine``: the server side of ColA gradient learning, driving one fitter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cotune.adapters.attach import active_set, adapters, merge, sites
from cotune.engines.base import LossFn, OptimConfig, StepResult
from cotune.engines.gradient_learning.capture import Capture, SiteRecord, refuse_stochastic_merge
from cotune.engines.gradient_learning.placement import make_fitter
from cotune.engines.gradient_learning.wire import Wire, affine_in_u
from cotune.engines.step import gradient_step
from cotune.engines.update import BadStepGuard, Window, check_loss
from cotune.errors import CotuneError


class GradientLearningEngine:
    """Forward and backward on the server with **no** trainable parameter; a fitter updates the adapters.

    The server's adapter parameters are frozen (``requires_grad=False``) but the adapters stay in the graph,
    so ``δ`` of an early site includes the paths through later adapters. Every site's ``(u, δ)`` is shipped
    to the fitter from inside the backward pass, as soon as its ``δ`` exists; the fitter takes one optimizer
    step per update on the local objective, whose gradient equals backprop's (see ``fitter``), so with the
    same ``OptimConfig`` the trajectory equals ``BackpropEngine``'s.

    Options:

    * ``interval = I``: buffer ``I`` micro-batches, then one step on the **mean** of their gradients (each
      micro-batch's loss is divided by ``I``), i.e. exactly ``BackpropEngine(grad_accum=I)``. The ColA
      reference summed over the interval (an ``I``-times larger step); we average so that switching
      engines never changes the effective learning rate.
    * ``placement``: ``thread`` (default; overlaps fitting with the backward pass), ``inline``, ``process``
      (a worker process, shared-memory weights), ``ray`` (an actor; ``pip install cotune[ray]``), ``remote``
      (the owner's machine: capture frames out, weights back later, see ``remote``) or ``loopback`` (the
      same frames answered in this process).
    * ``merged``: fold ``ΔW`` into the base weights; the server never runs the adapter, the fitter
      recomputes ``g(u)``; after each update the merge is refreshed from the pristine weight (no drift).
      Mergeable families only, and only deterministic ones: an adapter drawing in training mode (dropout,
      random pairings) is refused, since the merged forward cannot apply its draws. ``close()`` unmerges.
    * ``wire_dtype``: ``fp32`` or ``bf16`` for ``u`` and ``δ`` in transit; ``sufficient_statistic``:
      ``auto`` ships ``Σ δ uᵀ`` instead of the pairs for adapters affine in ``u`` when it is smaller and the
      fitter is remote (process, ray: an in-memory fitter reads the pairs for free), ``always`` whenever
      possible, ``off`` never. Bytes shipped are in ``StepResult.stats``.
    * ``timeout_s``: the longest the server waits for the fitter; ``max_bad_steps``: NaN/inf steps in a row
      before a ``CotuneError`` (each one is skipped with a logged warning).
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        interval: int = 1,
        placement: str = "thread",
        merged: bool = False,
        wire_dtype: str = "fp32",
        sufficient_statistic: str = "auto",
        device: torch.device | str | None = None,
        timeout_s: float = 120.0,
        max_bad_steps: int = 10,
        name: str | None = None,
        threads: int = 1,
        ray_options: dict[str, Any] | None = None,
    ) -> None:
        if interval < 1:
            raise CotuneError(f"interval must be >= 1, got {interval}")
        self.model = model
        self.name = name or active_set(model)
        self.adapters = adapters(model, self.name) if self.name else {}
        if not self.adapters:
            raise CotuneError("gradient learning: the model has no adapter set to train; attach one first")
        self.interval = interval
        self.merged = merged
        self.guard = BadStepGuard(max_bad_steps, "gradient learning")
        self.window = Window(interval, self.guard)
        self.traffic_total = 0
        self._closed = False
        statistic = {} if sufficient_statistic == "off" else {p: affine_in_u(ad) for p, ad in self.adapters.items()}
        self.wire = Wire(wire_dtype, statistic, sufficient_statistic, remote=placement not in ("inline", "thread"))
        # The server trains nothing: adapters stay in the graph (differentiable in u) but need no gradient.
        for ad in self.adapters.values():
            ad.requires_grad_(False)
        if merged:
            try:
                for path, ad in self.adapters.items():
                    refuse_stochastic_merge(path, ad)
                merge(model, self.name)
            except CotuneError as e:
                self._undo_merge()
                self._restore_grad()
                raise CotuneError(f"gradient learning with merged=True: {e}") from e
        self.capture = Capture(model, self.name, on_delta=self._ship)
        try:
            self.fitter = make_fitter(
                placement, self.adapters, optim, device, timeout_s, self.name, threads, ray_options
            )
        except BaseException:
            self._undo_merge()
            self._restore_grad()
            raise
        self.capture.install()

    # -- the step ----------------------------------------------------------------------------------
    def _ship(self, rec: SiteRecord) -> None:
        self.fitter.submit(self.wire.pack(rec, self.adapters[rec.path]))

    kind = "gradient"

    @property
    def scale(self) -> float:
        return 1.0 / self.interval

    def step(self, loss_fn: LossFn, batch: Any) -> StepResult:
        """One micro-batch of forward + backward (pairs go to the fitter); every ``interval``-th call updates."""
        forward = lambda: {self.name: check_loss(loss_fn(self.model, batch), "gradient learning")}  # noqa: E731
        return gradient_step({self.name: self}, forward)[self.name]

    # -- the phases of a shared step (cotune.engines.step) -----------------------------------------
    def begin(self) -> None:
        """Start capturing this set's ``(u, h)`` for the coming forward."""
        if self._closed:
            raise CotuneError("gradient learning: this engine was closed; build a new one")
        self.capture.begin()

    def backward_begins(self) -> None:
        """From here on a site running again is checkpoint recomputation, which cannot be paired."""
        self.capture.backward_phase()

    def abort(self) -> None:
        """The forward or backward failed: drop this window's pairs at the fitter."""
        self.capture.end()
        self.window.reset()
        self.wire.reset()
        try:
            self.fitter.discard()
        except CotuneError:
            pass  # the fitter is gone; the original error says more

    def finish(self, value: float, reason: str | None = None) -> StepResult:
        """After the backward (every pair is at the fitter): every ``interval``-th micro-batch, its update."""
        records = self.capture.end()
        skipped = reason is not None
        stats = self.wire.counters()
        stats["sites_without_delta"] = 0.0 if skipped else float(sum(r.delta is None for r in records))
        self.traffic_total += int(stats["wire_bytes"])
        self.wire.reset()
        good = self.window.add(reason)
        if good is None:
            return StepResult(value, updated=False, skipped=skipped, stats=stats, reason=reason)
        if not good:  # every micro-batch of the window was skipped: nothing to apply
            self.fitter.discard()
            return StepResult(value, updated=False, skipped=True, stats=stats, reason=reason)
        res = self.fitter.step()
        updated = bool(res["updated"])
        if not updated:
            reason = f"non-finite gradient (norm {res['grad_norm']})"
        self.window.updated(updated, reason, skipped)
        if updated and self.merged:
            for site in self.capture.sites.values():
                site.refresh_merge()
        stats.update({k: float(res[k]) for k in ("grad_norm", "fit_s", "lr")})
        return StepResult(value, updated=updated, skipped=skipped or not updated, stats=stats, reason=reason)

    # -- checkpoints and shutdown -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"fitter": self.fitter.state_dict(), "micro": self.window.micro, "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fitter.load_state_dict(state["fitter"])
        self.window.micro = int(state.get("micro", 0))
        self.guard.load_state_dict(state.get("guard", {}))

    def close(self) -> None:
        """Stop the fitter, remove the capture, unmerge, and make the adapters trainable again. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.capture.remove()
        self.fitter.close()
        self._undo_merge()
        self._restore_grad()

    def _undo_merge(self) -> None:
        if self.merged:
            for site in sites(self.model).values():
                if site.merged == self.name:
                    site.unmerge()

    def _restore_grad(self) -> None:
        for ad in self.adapters.values():
            ad.requires_grad_(True)

    def __enter__(self) -> GradientLearningEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
