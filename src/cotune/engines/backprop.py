"""backprop: ordinary training of one adapter set's parameters, the reference engine."""

from __future__ import annotations

from typing import Any

from torch import nn

from cotune.adapters.attach import active_set, trainable_parameters
from cotune.engines.base import LossFn, OptimConfig, StepResult, make_optimizer, make_scheduler
from cotune.engines.step import gradient_step
from cotune.engines.update import BadStepGuard, Window, apply_update, check_loss
from cotune.errors import CotuneError


class BackpropEngine:
    """Forward, backward, one optimizer step on the adapter set ``name`` (default: the active set).

    ``grad_accum = I`` buffers ``I`` micro-batches and then steps on the *mean* of their gradients (each
    micro-batch's loss is divided by ``I``), the same normalisation gradient learning uses for its update
    interval. A non-finite loss skips its micro-batch (no backward); a non-finite gradient drops the
    accumulated window; ``max_bad_steps`` such events in a row stop training with a ``CotuneError``.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        grad_accum: int = 1,
        max_bad_steps: int = 10,
        name: str | None = None,
    ) -> None:
        if grad_accum < 1:
            raise CotuneError(f"grad_accum must be >= 1, got {grad_accum}")
        self.model = model
        self.name = name or active_set(model)
        self.params = trainable_parameters(model, self.name)
        if not self.params:
            raise CotuneError(
                "backprop: the model has no adapter set to train; attach one first (cotune.adapters.attach)"
            )
        for p in self.params.values():
            p.requires_grad_(True)
            p.grad = None  # a stale gradient from an earlier backward must not leak into the first step
        self.optim = optim
        self.optimizer = make_optimizer(self.params.items(), optim)
        self.scheduler = make_scheduler(self.optimizer, optim)
        self.grad_accum = grad_accum
        self.guard = BadStepGuard(max_bad_steps, "backprop")
        self.window = Window(grad_accum, self.guard)

    kind = "gradient"

    @property
    def scale(self) -> float:
        return 1.0 / self.grad_accum

    def step(self, loss_fn: LossFn, batch: Any) -> StepResult:
        """One micro-batch; every ``grad_accum``-th call also updates the adapters."""
        forward = lambda: {self.name: check_loss(loss_fn(self.model, batch), "backprop")}  # noqa: E731
        return gradient_step({self.name: self}, forward)[self.name]

    # -- the phases of a shared step (cotune.engines.step) -----------------------------------------
    def begin(self) -> None:
        """Nothing to prepare: the parameters already require grad."""

    def backward_begins(self) -> None:
        """Gradients accumulate in ``.grad`` during the shared backward."""

    def abort(self) -> None:
        """The forward or backward failed: drop the half-accumulated window."""
        self.optimizer.zero_grad(set_to_none=True)
        self.window.reset()

    def finish(self, value: float, reason: str | None = None) -> StepResult:
        """After the backward: count the micro-batch, and every ``grad_accum``-th one apply the update."""
        skipped = reason is not None
        good = self.window.add(reason)
        if good is None:
            return StepResult(value, updated=False, skipped=skipped, reason=reason)
        if not good:  # every micro-batch of the window was skipped: nothing to apply
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(value, updated=False, skipped=True, reason=reason)
        updated, norm = apply_update(
            list(self.params.values()), self.optimizer, self.scheduler, self.optim.max_grad_norm
        )
        if not updated:
            reason = f"non-finite gradient (norm {norm})"
        self.window.updated(updated, reason, skipped)
        stats = {"grad_norm": norm, "lr": self.optimizer.param_groups[0]["lr"]}
        return StepResult(value, updated=updated, skipped=skipped or not updated, stats=stats, reason=reason)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro": self.window.micro,
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.window.micro = int(state.get("micro", 0))
        self.guard.load_state_dict(state.get("guard", {}))

    def close(self) -> None:
        """Nothing runs in the background; drops any half-accumulated gradient."""
        self.abort()
