"""The optimizer update every engine and fitter shares, and the bad-step guard (NaN/inf handling).

Backprop and every gradient-learning fitter call ``apply_update`` on the same parameters in the same
order, which is what makes their trajectories equal: the same norm, the same clipping, the same step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from cotune.errors import CotuneError

log = logging.getLogger("cotune.engines")


def grad_norm(params: Sequence[nn.Parameter]) -> float:
    """The global L2 norm of the gradients (``inf``/``nan`` when any is non-finite; 0 with no gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def apply_update(
    params: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    max_grad_norm: float | None,
) -> tuple[bool, float]:
    """One optimizer step from the accumulated ``.grad``: skipped (grads dropped) when any is non-finite.

    Returns ``(updated, grad_norm)``; the norm is taken before clipping. The schedule only advances on a
    real update, so a skipped step does not shorten warm-up or decay.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads, norm_type=2.0)) if grads else 0.0
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False, norm
    if max_grad_norm is not None and grads:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, torch.tensor(norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return True, norm


class BadStepGuard:
    """Counts consecutive skipped (NaN/inf) steps and stops training after ``max_bad_steps`` in a row."""

    def __init__(self, max_bad_steps: int, engine: str) -> None:
        if max_bad_steps < 1:
            raise CotuneError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.engine = engine
        self.in_a_row = 0
        self.total = 0

    def bad(self, why: str) -> None:
        """Record one skipped step; raises ``CotuneError`` once ``max_bad_steps`` happened in a row."""
        self.in_a_row += 1
        self.total += 1
        log.warning("%s: skipped a step (%s); %d in a row", self.engine, why, self.in_a_row)
        if self.in_a_row >= self.max_bad_steps:
            raise CotuneError(
                f"{self.engine}: {self.in_a_row} steps in a row had a non-finite loss or gradient (last: {why}); "
                "lower the learning rate, enable max_grad_norm, or check the data and the model's dtype"
            )

    def good(self) -> None:
        self.in_a_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state.get("in_a_row", 0)), int(state.get("total", 0))


class Window:
    """The micro-batches of one update (``grad_accum`` / the interval ``I``), counted for the bad-step guard.

    Backprop and gradient learning share it, so both skip, count and close a window the same way.
    """

    def __init__(self, size: int, guard: BadStepGuard) -> None:
        self.size, self.guard = size, guard
        self.micro = 0
        self.good = 0  # micro-batches of the open window that contributed a gradient

    def add(self, reason: str | None) -> int | None:
        """Count one micro-batch (``reason``: why it was skipped). ``None`` while the window stays open;
        when it closes, how many of its micro-batches contributed (and the next window starts)."""
        self.micro += 1
        if reason is None:
            self.good += 1
        else:
            self.guard.bad(reason)
        if self.micro < self.size:
            return None
        good, self.micro, self.good = self.good, 0, 0
        return good

    def updated(self, ok: bool, reason: str | None, skipped: bool) -> None:
        """The window's update ran: ``ok`` False (non-finite gradient, ``reason``) is a bad step."""
        if not ok:
            self.guard.bad(reason or "non-finite gradient")
        elif not skipped:
            self.guard.good()

    def reset(self) -> None:
        self.micro = self.good = 0


def check_loss(loss: object, engine: str) -> torch.Tensor:
    """The loss as a scalar tensor, or a clear error naming what ``loss_fn`` returned instead."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise CotuneError(f"{engine}: loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())
