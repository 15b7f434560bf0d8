"""The engine interface and the optimizer/schedule construction every engine and fitter shares."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from cotune.errors import CotuneError

#: ``loss_fn(model, batch) -> scalar loss``: runs the forward pass; engines decide how gradients flow.
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class OptimConfig:
    """Optimizer and schedule of one adapter set (the same for backprop and for every ColA fitter)."""

    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    scheduler: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    total_steps: int | None = None  # needed by linear / cosine
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        # Refused here, before any step: a NaN or infinite hyper-parameter would otherwise write NaN into
        # every adapter weight at the first update (SGD) or fail deep inside torch (AdamW).
        def number(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > low if low_open else v >= low) and v < high
            if not ok:
                bound = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
                raise CotuneError(f"optimizer: {name} must be a finite number {bound}, got {v!r}")

        for name in ("lr", "weight_decay", "momentum"):
            number(name, 0.0)
        number("eps", 0.0, low_open=True)
        if not (isinstance(self.betas, tuple | list) and len(self.betas) == 2):
            raise CotuneError(f"optimizer: betas must be two numbers, got {self.betas!r}")
        self.betas = (self.betas[0], self.betas[1])
        for i, b in enumerate(self.betas):
            if not (isinstance(b, int | float) and math.isfinite(b) and 0.0 <= b < 1.0):
                raise CotuneError(f"optimizer: betas[{i}] must be a finite number in [0, 1), got {b!r}")
        if self.max_grad_norm is not None:
            number("max_grad_norm", 0.0, low_open=True)
        for name in ("warmup_steps", "total_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise CotuneError(f"optimizer: {name} must be a whole number >= 0, got {v!r}")


@dataclass
class StepResult:
    """What one ``Engine.step`` reports. ``updated`` is False for a buffered micro-batch (I > 1)."""

    loss: float
    updated: bool = True
    skipped: bool = False  # a NaN/inf loss or gradient: no update was made
    stats: dict[str, float] = field(default_factory=dict)  # e.g. bytes shipped, fit seconds
    reason: str | None = None  # why the step was skipped


class Engine(Protocol):
    """One training engine bound to a model and one adapter set (``name``; default: the active set).

    ``kind`` says how ``cotune.engines.step`` drives it inside a step shared with other sets: ``gradient``
    engines (``begin``, ``scale``, ``backward_begins``, ``finish``, ``abort``) share one forward and one
    backward; ``forward`` engines (``draw_seeds``, ``perturb``, ``finish``) share inference forwards.
    """

    kind: str
    name: str

    def step(self, loss_fn: LossFn, batch: Any) -> StepResult:
        """Run one training step on ``batch``; afterwards the model's adapters hold the new weights."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and fitter state for checkpoints (adapter weights are saved separately)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Stop fitters / workers; idempotent."""
        ...


ENGINES = {
    "backprop": "cotune.engines.backprop:BackpropEngine",
    "gl": "cotune.engines.gradient_learning:GradientLearningEngine",
    "zo": "cotune.engines.zeroth_order:ZerothOrderEngine",
}


def make_engine(engine: str, model: nn.Module, optim: OptimConfig, **options: Any) -> Engine:
    """Build engine ``engine`` (backprop | gl | zo | a registered one) for an adapter set of ``model``.

    ``options`` go to the engine; ``name=`` picks the adapter set (default: the active one).
    """
    if engine not in ENGINES:
        raise CotuneError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    mod, _, cls = ENGINES[engine].partition(":")
    return getattr(importlib.import_module(mod), cls)(model, optim, **options)


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases and norm weights get no weight decay (the usual convention, and MeZO's)."""
    return p.dim() < 2 or name.endswith("bias") or "norm" in name.lower()


def make_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The torch optimizer for ``named_params`` with no decay on biases and norms."""
    decay, rest = [], []
    for n, p in named_params:
        (rest if no_decay(n, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    name = cfg.optimizer.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise CotuneError(f"unknown optimizer {cfg.optimizer!r}; valid: adamw, adam, sgd")


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then constant, linear or cosine decay to zero at ``total_steps``."""
    kind = cfg.scheduler.lower()
    if kind not in ("constant", "linear", "cosine"):
        raise CotuneError(f"unknown scheduler {cfg.scheduler!r}; valid: constant, linear, cosine")
    if kind != "constant" and not cfg.total_steps:
        raise CotuneError(f"scheduler {kind!r} needs total_steps")
    warm, total = cfg.warmup_steps, cfg.total_steps or 1

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
