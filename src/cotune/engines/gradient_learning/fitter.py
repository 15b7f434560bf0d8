"""The fitter: owns one adapter set's trainable weights, optimizer and schedule, and updates them from pairs.

For one captured call the local objective is ``ℓ(w) = ½‖g(u; w) − sg(g(u; w_t) − s·δ)‖²`` (summed over
tokens), and the fitter takes **one** optimizer step on the sum of these objectives over the sites and
calls of an update window. Only the gradient at ``w_t`` is ever used, and there the residual
``g(u; w_t) − target`` is ``s·δ`` exactly, so ``∇ℓ(w_t) = J_gᵀ (s·δ)``: the fitter back-propagates ``s·δ``
through its own evaluation of ``s·g(u; w)`` (a vector-Jacobian product). Forming the target and
subtracting would give the same number up to cancellation error (``g`` can be far larger than ``s·δ``);
the closed form keeps gradient learning equal to backprop to the last bits. This is the same gradient
backprop computes, so with the same optimizer the parameters match step by step.

The fitter knows nothing of how pairs were produced (one model, a tenant's rows of a mixed batch) or
where it runs (thread, process, Ray actor): see ``placement``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from cotune.adapters.base import Adapter
from cotune.adapters.site import AdaptedModule
from cotune.engines.base import OptimConfig, make_optimizer, make_scheduler
from cotune.engines.gradient_learning.wire import Message, Pair, Statistic, site_widths
from cotune.engines.update import apply_update
from cotune.errors import CotuneError


class Fitter:
    """Trains ``adapters`` (``{site path: Adapter}``, modules it owns) from ``Pair``/``Statistic`` messages.

    Parameters are named ``<site path>.<param>`` (as ``cotune.adapters.trainable_parameters`` names them)
    so the optimizer's no-decay groups equal backprop's. ``add`` accumulates the local-objective
    gradient of one message into ``.grad``; ``step`` applies clipping, one optimizer step and the schedule
    (or skips the update when a gradient is non-finite).
    """

    def __init__(
        self, adapters: dict[str, Adapter], optim: OptimConfig, device: torch.device | str | None = None
    ) -> None:
        self.adapters = adapters
        self.device = torch.device(device) if device is not None else _device_of(adapters)
        self.named = {f"{path}.{k}": p for path, ad in adapters.items() for k, p in ad.named_parameters()}
        if not self.named:
            raise CotuneError("fitter: the adapter set has no parameters to train")
        for p in self.named.values():
            p.requires_grad_(True)
        self.optim = optim
        self.optimizer = make_optimizer(self.named.items(), optim)
        self.scheduler = make_scheduler(self.optimizer, optim)
        self.fit_seconds = 0.0
        self.messages = 0

    def add(self, msg: Message) -> None:
        """Accumulate the gradient of one call's local objective (``∇ℓ`` at the current weights)."""
        ad = self.adapters.get(msg.path)
        if ad is None:
            raise CotuneError(f"fitter: pair for unknown site {msg.path!r}; this fitter trains {sorted(self.adapters)}")
        t0 = time.perf_counter()
        with torch.enable_grad():
            if isinstance(msg, Pair):
                self._add_pair(ad, msg)
            else:
                self._add_statistic(ad, msg)
        self.fit_seconds += time.perf_counter() - t0
        self.messages += 1

    def _add_pair(self, ad: Adapter, msg: Pair) -> None:
        d_u, d_h = site_widths(ad)
        u, delta = msg.u.to(self.device), msg.delta.to(self.device)
        if u.is_floating_point() and u.shape[-1] != d_u:
            raise CotuneError(
                f"site {msg.path!r}: captured u has width {u.shape[-1]} but its {ad.config.family} adapter "
                f"({ad.site} site) reads width {d_u}; the pair does not belong to this adapter"
            )
        lead = tuple(u.shape[:-1]) if u.is_floating_point() else tuple(u.shape)
        if tuple(delta.shape) != (*lead, d_h):
            raise CotuneError(
                f"site {msg.path!r}: δ has shape {tuple(delta.shape)} but u {tuple(u.shape)} and the adapter's "
                f"output width {d_h} need {(*lead, d_h)}"
            )
        ad.train(msg.training)
        factors = ad.lowrank_factors() if u.is_floating_point() else None
        if factors is not None:
            _lowrank_vjp(ad, *factors, u, delta)
            return
        try:
            out = AdaptedModule.delta(ad, u, msg.seed)  # s·g(u; w) in fp32, exactly as the site computes it
        except RuntimeError as e:
            raise CotuneError(f"site {msg.path!r}: the adapter could not run on the captured u: {e}") from e
        out.backward(delta.to(out.dtype))

    def _add_statistic(self, ad: Adapter, msg: Statistic) -> None:
        # s·g(u) = D u + c  =>  Σ_t δ_tᵀ(D u_t + c) = <D, Σ δ uᵀ> + <c, Σ δ>; autograd gives its gradient.
        # D and c are formed from float64 copies of the weights: the contraction with S = Σ δ uᵀ cancels
        # heavily, and in fp32 it pushed the statistic path outside backprop's own rounding envelope (2.75x at
        # I = 4 for loretta_rep); in float64 it costs the fitter O(d_out·d_in) per site, nothing on the server.
        ad.train(False)
        wide = {f"ad.{k}": t.double() for k, t in [*ad.named_parameters(), *ad.named_buffers()] if t.is_floating_point()}
        d_u, _ = site_widths(ad)
        zero = torch.zeros(1, d_u, device=self.device, dtype=torch.float64)
        d, c = torch.func.functional_call(_Affine(ad), wide, (zero,))
        if d is None or not d.requires_grad:
            raise CotuneError(
                f"site {msg.path!r}: the {ad.config.family} adapter's delta_weight() is not differentiable in its "
                "parameters, so the sufficient statistic cannot train it; use sufficient_statistic='off'"
            )
        s, dsum = msg.s.to(self.device, torch.float64), msg.delta_sum.to(self.device, torch.float64)
        ((d * s).sum() + (c * dsum).sum()).backward()

    def step(self) -> dict[str, Any]:
        """One optimizer step on the accumulated gradients; ``updated`` is False when one was non-finite."""
        t0 = time.perf_counter()
        updated, norm = apply_update(
            list(self.named.values()), self.optimizer, self.scheduler, self.optim.max_grad_norm
        )
        fit = self.fit_seconds + time.perf_counter() - t0
        stats = {
            "updated": updated,
            "grad_norm": norm,
            "fit_s": fit,
            "messages": self.messages,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self.fit_seconds, self.messages = 0.0, 0
        return stats

    def discard(self) -> None:
        """Drop the accumulated gradients (the server abandoned the window)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.fit_seconds, self.messages = 0.0, 0

    def weights(self) -> dict[str, torch.Tensor]:
        """Detached current weights by qualified name."""
        return {k: p.detach() for k, p in self.named.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _lowrank_vjp(ad: Adapter, a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, delta: torch.Tensor) -> None:
    """``J_gᵀ (s·δ)`` for ``s·g(u) = s·B A u`` in closed form, accumulated into ``A.grad`` and ``B.grad``.

    The three products autograd's backward forms (``dB = (sδ)ᵀ(Au)``, ``dA = ((sδ)B)ᵀu``), in its order, so
    the bits are the same; skipping the re-evaluation of ``B A u`` and the graph saves about a quarter of a
    small site's fitting time (docs/RESULTS.md, "Many tenants on one base").
    """
    dt = ad.compute_dtype
    u2 = u.to(dt).reshape(-1, u.shape[-1])
    sd = ad.scaling * delta.to(dt).reshape(-1, delta.shape[-1])
    grads = ((a, ((sd @ b.detach()).T @ u2)), (b, sd.T @ (u2 @ a.detach().T)))
    for p, g in grads:
        if p.grad is None:
            p.grad = g.to(p.dtype)
        else:
            p.grad.add_(g)


def _device_of(adapters: dict[str, nn.Module]) -> torch.device:
    for ad in adapters.values():
        for p in ad.parameters():
            return p.device
    return torch.device("cpu")


class _Affine(nn.Module):
    """``(D, c)`` of ``s·g(u) = D u + c`` as one forward, so ``torch.func.functional_call`` can evaluate it on
    float64 copies of the weights; ``c`` comes from ``AdaptedModule.delta``, as every other ``s·g``."""

    def __init__(self, ad: Adapter) -> None:
        super().__init__()
        self.ad = ad

    def forward(self, zero: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.ad.delta_weight(), AdaptedModule.delta(self.ad, zero)[0]
