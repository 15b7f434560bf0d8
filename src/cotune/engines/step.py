"""One training step for every engine, whether it trains one adapter set or many tenants' sets at once.

A step is one forward that yields a loss per adapter set, then each set's engine makes its own update.
Sets never share rows (a tenant's adapters reach only its rows), so summing their losses gives each set
exactly the gradient it would get alone. Engines come in two kinds (``Engine.kind``):

* ``gradient`` (backprop, gl): every engine ``begin()``s, ONE forward, ONE backward of
  ``Σ_k L_k·scale_k`` (``scale = 1/I`` for an update interval or gradient accumulation ``I``), then each
  engine's ``finish``: backprop steps its optimizer, gradient learning its fitter.
* ``forward`` (zo): per direction, every set is moved to ``θ + εz`` at once, one inference forward, then
  ``θ − εz`` and a second forward with the same random draws, then back; each engine's ``finish`` turns its
  two losses per direction into its update.

``Engine.step(loss_fn, batch)`` of a single job is this with one set; ``MultiTenantTrainer`` is this with a
mixed batch of many.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import torch

from cotune.engines.base import StepResult
from cotune.errors import CotuneError

#: per adapter set: its loss on this step's rows, or the exception that kept it from having one
Losses = dict[str, "torch.Tensor | Exception"]


def describe(e: BaseException) -> str:
    """``e`` as a reason a user can act on (a ``CotuneError`` already is one)."""
    return str(e) if isinstance(e, CotuneError) else f"{type(e).__name__}: {e}"


def finish_all(engines: Mapping[str, Any], isolate: bool, *args_of: Callable[[str], Any]) -> dict[str, StepResult]:
    """Each engine's ``finish(*(f(name) for f in args_of))``. ``isolate``: an engine's own failure (a dead
    fitter, its bad-step guard) becomes its skipped step instead of stopping the others."""
    out = {}
    for name, e in engines.items():
        try:
            out[name] = e.finish(*(f(name) for f in args_of))
        except Exception as exc:
            if not isolate:
                raise
            out[name] = StepResult(math.nan, updated=False, skipped=True, reason=describe(exc))
    return out


def gradient_step(
    engines: Mapping[str, Any], forward: Callable[[], Losses], isolate: bool = False
) -> dict[str, StepResult]:
    """One forward (``forward()``: a loss per set) and one backward for gradient engines, then each update.

    A set whose loss failed or is non-finite contributes no gradient and its engine skips the micro-batch;
    the others are unaffected. An exception in the forward or the backward itself aborts every engine's
    micro-batch and propagates. ``isolate``: see ``finish_all``.
    """
    for e in engines.values():
        e.begin()
    try:
        losses = forward()
        values: dict[str, float] = {}
        reasons: dict[str, str] = {}
        total: torch.Tensor | None = None
        for name, loss in losses.items():
            if isinstance(loss, Exception):
                values[name], reasons[name] = math.nan, f"loss failed: {describe(loss)}"
                continue
            values[name] = float(loss.detach())
            if not math.isfinite(values[name]):
                reasons[name] = f"non-finite loss ({values[name]})"
                continue
            if not loss.requires_grad:
                reasons[name] = (
                    f"adapter set {name!r}: the loss does not depend on its adapters; check that the forward "
                    "runs the model with that set active"
                )
                if len(engines) == 1:  # a single job's mistake: say so at once
                    raise CotuneError(reasons[name])
                continue  # one tenant's frozen adapters skip that tenant, not the batch
            term = loss * engines[name].scale
            total = term if total is None else total + term
        if total is not None:
            for e in engines.values():
                e.backward_begins()
            total.backward()
    except BaseException:
        for e in engines.values():
            e.abort()
        raise
    return finish_all(engines, isolate, lambda n: values.get(n, math.nan), reasons.get)


def forward_step(
    engines: Mapping[str, Any], forward: Callable[[], dict[str, float]], isolate: bool = False
) -> dict[str, StepResult]:
    """Zeroth-order directions of every set at once: ``forward()`` is an inference forward, a loss per set.
    ``isolate``: see ``finish_all``."""
    seeds = {name: e.draw_seeds() for name, e in engines.items()}
    plus: dict[str, list[float]] = {name: [] for name in engines}
    minus: dict[str, list[float]] = {name: [] for name in engines}
    for k in range(max(len(s) for s in seeds.values())):
        movers = {name: s[k] for name, s in seeds.items() if k < len(s)}
        rng = rng_state()
        for name, seed in movers.items():
            engines[name].perturb(seed, 1.0)
        try:
            up = forward()
            set_rng_state(rng)  # the same dropout / adapter draws for the second forward
            for name, seed in movers.items():
                engines[name].perturb(seed, -2.0)
            down = forward()
        finally:
            for name, seed in movers.items():  # back to θ (up to rounding), never a stored copy
                engines[name].perturb(seed, 1.0)
        for name in movers:
            plus[name].append(up.get(name, math.nan))
            minus[name].append(down.get(name, math.nan))
    return finish_all(engines, isolate, seeds.__getitem__, plus.__getitem__, minus.__getitem__)


def rng_state() -> tuple[Any, torch.Tensor, list[torch.Tensor] | None]:
    """Python, torch CPU and CUDA generator states (what dropout and adapter draws consume)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Any, torch.Tensor, list[torch.Tensor] | None]) -> None:
    py, cpu, cuda = state
    random.setstate(py)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
