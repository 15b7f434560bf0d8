"""zeroth order (MeZO): two inference-mode forwards per direction, no backward, no activations kept.

Per step and direction ``k`` a seed is drawn; every trainable tensor is moved in place to ``θ + εz``,
then ``θ − εz``, then back, where ``z`` is regenerated from the seed tensor by tensor (``zo_direction``) and
never stored. ``g_k = (loss₊ − loss₋) / 2ε`` is the projected gradient; the update regenerates each ``z_k``
once more:

* ``zo_optimizer="sgd"`` (MeZO): ``θ ← θ − lr·((1/n)Σ_k g_k·z_k + wd·θ)`` in place, with no decay on
  biases and norm parameters (``wd`` = ``OptimConfig.weight_decay``, ``lr`` after the schedule);
* ``"adam"`` / ``"momentum"``: ``(1/n)Σ_k g_k·z_k`` is written into ``.grad`` and a torch AdamW / SGD with
  ``OptimConfig.momentum`` steps (their state costs memory, as usual).

Both forwards of a direction see the same random draws (dropout, stochastic adapters): the RNG state is
rewound before the second one, so the difference measures the perturbation only.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from typing import Any

import torch
from torch import nn

from cotune.adapters.attach import active_set, trainable_parameters
from cotune.engines.base import LossFn, OptimConfig, StepResult, make_optimizer, make_scheduler, no_decay
from cotune.engines.step import forward_step
from cotune.engines.update import BadStepGuard, check_loss
from cotune.errors import CotuneError

ZO_OPTIMIZERS = ("sgd", "adam", "momentum")


def zo_direction(seed: int, index: int, p: torch.Tensor) -> torch.Tensor:
    """The perturbation ``z`` of the ``index``-th trainable tensor for ``seed``: standard normal, ``p``'s shape.

    Each tensor has its own generator seeded from ``(seed, index)``, so any tensor's ``z`` is regenerated
    on its own device without drawing the others'.
    """
    gen = torch.Generator(device=p.device)
    gen.manual_seed((int(seed) * 1_000_003 + index) % (2**63 - 1))
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype)


class ZerothOrderEngine:
    """MeZO on the active adapter set: ``eps`` (ε), ``n_directions`` averaged per step, ``zo_optimizer``.

    ``seed`` fixes the engine's own stream of direction seeds (reproducible runs). ``StepResult.loss`` is
    the mean of ``loss₊`` and ``loss₋`` over the directions; ``stats`` holds the projected gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        eps: float = 1e-3,
        n_directions: int = 1,
        zo_optimizer: str = "sgd",
        seed: int = 0,
        max_bad_steps: int = 10,
        name: str | None = None,
    ) -> None:
        if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
            raise CotuneError(f"zeroth order: eps must be > 0 and finite, got {eps!r}")
        if n_directions < 1:
            raise CotuneError(f"n_directions must be >= 1, got {n_directions}")
        if zo_optimizer not in ZO_OPTIMIZERS:
            raise CotuneError(f"unknown zo_optimizer {zo_optimizer!r}; valid: {', '.join(ZO_OPTIMIZERS)}")
        self.model = model
        self.name = name or active_set(model)
        self.params = trainable_parameters(model, self.name)
        if not self.params:
            raise CotuneError("zeroth order: the model has no adapter set to train; attach one first")
        self.eps, self.n_directions, self.zo_optimizer = float(eps), n_directions, zo_optimizer
        self.optim = optim
        torch_opt = {"sgd": "sgd", "momentum": "sgd", "adam": "adamw"}[zo_optimizer]
        cfg = dataclasses.replace(
            optim, optimizer=torch_opt, momentum=optim.momentum if zo_optimizer == "momentum" else 0.0
        )
        # In "sgd" mode the torch optimizer only carries the learning-rate schedule; the update is in place.
        self.optimizer = make_optimizer(self.params.items(), cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.decay = {n: (0.0 if no_decay(n, p) else optim.weight_decay) for n, p in self.params.items()}
        self.rng = random.Random(seed)
        self.guard = BadStepGuard(max_bad_steps, "zeroth order")

    kind = "forward"

    def step(self, loss_fn: LossFn, batch: Any) -> StepResult:
        """``n_directions`` pairs of forwards, then one update (skipped when a loss is non-finite)."""

        def forward() -> dict[str, float]:
            with torch.inference_mode():
                return {self.name: float(check_loss(loss_fn(self.model, batch), "zeroth order"))}

        return forward_step({self.name: self}, forward)[self.name]

    # -- the phases of a shared step (cotune.engines.step) -----------------------------------------
    def draw_seeds(self) -> list[int]:
        """This step's direction seeds (from the engine's own stream: reproducible, resumable)."""
        return [self.rng.getrandbits(62) for _ in range(self.n_directions)]

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """``θ ← θ + scale·ε·z(seed)``, tensor by tensor, ``z`` regenerated and never stored."""
        for i, p in enumerate(self.params.values()):
            p.add_(zo_direction(seed, i, p), alpha=scale * self.eps)

    def finish(self, seeds: list[int], plus: list[float], minus: list[float]) -> StepResult:
        """The projected gradients ``(loss₊ − loss₋) / 2ε`` and one update (none if a loss is non-finite)."""
        grads = [(a - b) / (2 * self.eps) for a, b in zip(plus, minus, strict=True)]
        losses = [x for pair in zip(plus, minus, strict=True) for x in pair]
        value = sum(losses) / len(losses)
        stats: dict[str, float] = {f"projected_grad_{k}": g for k, g in enumerate(grads)}
        if not all(math.isfinite(x) for x in losses):
            reason = f"non-finite loss {losses}"
            self.guard.bad(reason)
            return StepResult(value, updated=False, skipped=True, stats=stats, reason=reason)
        self._update(seeds, grads)
        self.guard.good()
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return StepResult(value, updated=True, stats=stats)

    @torch.no_grad()
    def _update(self, seeds: list[int], grads: list[float]) -> None:
        n = len(seeds)
        if self.zo_optimizer == "sgd":
            lr = self.optimizer.param_groups[0]["lr"]
            for i, (name, p) in enumerate(self.params.items()):
                if self.decay[name]:
                    p.mul_(1.0 - lr * self.decay[name])
                for seed, g in zip(seeds, grads):
                    p.add_(zo_direction(seed, i, p), alpha=-lr * g / n)
            with warnings.catch_warnings():  # the schedule advances without optimizer.step() in this mode
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            return
        for i, p in enumerate(self.params.values()):
            grad = torch.zeros_like(p)
            for seed, g in zip(seeds, grads):
                grad.add_(zo_direction(seed, i, p), alpha=g / n)
            p.grad = grad
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.getstate(),
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.guard.load_state_dict(state.get("guard", {}))

    def close(self) -> None:
        """Nothing runs in the background."""

