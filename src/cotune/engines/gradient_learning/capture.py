"""Server-side capture of ``(u, δ)`` at every adapter site, paired by call (gradient learning).

The capture is its adapter set's tap at every site (``AdaptedModule.taps[name]``): it stores ``u``
(detached) and the call's seed and registers a gradient hook on ``h``, the tensor the adapter's
contribution is added to, so ``δ = ∂L/∂h`` is known the moment autograd computes it (and a fitter can
start on it while the backward pass goes on). Merged, no adapter runs: the site taps the module input as
``u`` and its output as ``h`` (the same tensor, since the adapter's contribution is folded into the weight),
and so does the tenant router for a tenant covered by a collaborative merge. In a mixed batch the router
taps each tenant's own rows, so every record already belongs to one adapter set: either ``h`` is the
tenant's own slice, or ``h`` is the whole batch's output and the tap's ``rows`` say which rows of its
gradient are the tenant's ``δ`` (one hook per tenant on the shared tensor, each taking a view of its rows).

Every call of a site produces its own record with its own ``h`` and hook, so a module called twice in
one forward (weight tying) yields two correctly paired records, numbered by ``call``. Calls made while
gradients are disabled (reentrant activation checkpointing) or during the backward pass (checkpoint
recomputation) cannot be paired with a ``δ`` and are refused with a ``CotuneError``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cotune.adapters.attach import active_set, sites
from cotune.adapters.base import Adapter
from cotune.adapters.site import AdaptedModule, Rows, take
from cotune.errors import CotuneError


@dataclass
class SiteRecord:
    """One call of one site: ``u`` and ``δ`` batch-first (rows can be split by tenant), the call's seed."""

    path: str
    call: int
    adapter: str  # adapter set name
    u: torch.Tensor
    seed: int | None
    training: bool
    delta: torch.Tensor | None = None
    u_version: int = field(default=0, repr=False)

    def check_unchanged(self) -> None:
        """``u`` must not have been modified in place since it was captured (it would no longer be ``u``)."""
        if self.u._version != self.u_version:
            raise CotuneError(
                f"site {self.path!r}: its input was modified in place after the adapter read it; "
                "gradient learning needs the original value (make that in-place operation out of place)"
            )


def refuse_stochastic_merge(path: str, ad: Adapter) -> None:
    """A merged adapter cannot draw (dropout, random pairings): say so instead of silently training without."""
    if ad.training and ad.stochastic:
        raise CotuneError(
            f"site {path!r}: merged=True cannot apply the {ad.config.family} adapter's random draws (dropout or "
            "random pairings act on the adapter path alone, which a merged weight no longer has); set its "
            "dropout to 0, put the adapters in eval mode, or train with merged=False"
        )


class Capture:
    """Installs the capture on every site of adapter set ``name`` and hands each finished pair on.

    ``on_delta(record)`` runs inside the backward pass as soon as the record's ``δ`` exists (the engine
    ships it to its fitter there). Records stay in ``records`` until ``end()``; records whose ``h`` did not
    reach the loss get no ``δ`` (their adapter's gradient is zero and backprop would not touch it either).

    Only active between ``begin()`` and ``end()``: forwards outside a training step (evaluation) pass
    through untouched.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str | None = None,
        on_delta: Callable[[SiteRecord], None] | None = None,
    ) -> None:
        self.model = model
        self.name = name or active_set(model)
        if self.name is None:
            raise CotuneError("gradient learning: no adapter set is active; attach one or pass its name")
        self.on_delta = on_delta
        self.sites: dict[str, AdaptedModule] = {p: s for p, s in sites(model).items() if self.name in s.adapters}
        if not self.sites:
            raise CotuneError(f"adapter set {self.name!r} has no site in this model")
        self.records: list[SiteRecord] = []
        self._calls: dict[str, int] = {}
        self._phase = "idle"  # idle | forward | backward
        self._lock = threading.Lock()
        self._installed = False

    # -- installation ----------------------------------------------------------------------------
    def install(self) -> None:
        """Set this set's tap on every site of the set."""
        if self._installed:
            return
        for path, site in self.sites.items():
            tap = site.taps.get(self.name)
            if tap is not None and tap != self._tap:
                raise CotuneError(
                    f"site {path!r}: adapter set {self.name!r} is already captured by another engine; close it first"
                )
            site.taps[self.name] = self._tap
        self._installed = True

    def remove(self) -> None:
        for site in self.sites.values():
            if site.taps.get(self.name) == self._tap:
                del site.taps[self.name]
        self._installed = False

    # -- phases ----------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start a forward pass: clear the records of the previous micro-batch."""
        self.records = []
        self._calls = {}
        self._phase = "forward"

    def backward_phase(self) -> None:
        self._phase = "backward"

    def end(self) -> list[SiteRecord]:
        """Stop capturing; returns the records (with ``δ`` where the loss reached them)."""
        self._phase = "idle"
        out, self.records = self.records, []
        return out

    # -- the hooks -------------------------------------------------------------------------------
    def _tap(
        self,
        site: AdaptedModule,
        ad: Adapter,
        u: torch.Tensor,
        h: torch.Tensor,
        seed: int | None,
        rows: Rows | None = None,
    ) -> torch.Tensor:
        if self._phase == "idle":
            return h
        training = ad.training
        if site.merged == self.name:
            # The server never runs the adapter: the fitter evaluates its deterministic (eval-mode) map.
            refuse_stochastic_merge(site.path, ad)
            seed, training = None, False
        if self._phase == "backward":
            raise CotuneError(
                f"site {site.path!r} ran again during the backward pass (activation checkpointing recomputes "
                "the forward): gradient learning cannot pair those calls; disable gradient checkpointing"
            )
        if not torch.is_grad_enabled():
            raise CotuneError(
                f"site {site.path!r} ran with gradients disabled during a training step (reentrant activation "
                "checkpointing or a no_grad region in the model): its δ cannot be captured; disable it"
            )
        if not isinstance(h, torch.Tensor):
            raise CotuneError(f"site {site.path!r} returned {type(h).__name__}; gradient learning needs a tensor")
        if not h.requires_grad:
            # Nothing upstream needs a gradient (frozen embeddings): make h a leaf so δ still flows here and
            # into every later site; no gradient is lost since nothing before h is trained.
            h = h.detach().requires_grad_()
        with self._lock:
            call = self._calls.get(site.path, 0)
            self._calls[site.path] = call + 1
        u = u.detach()
        rec = SiteRecord(site.path, call, self.name, u, seed, training, u_version=u._version)
        self.records.append(rec)
        if rows is None:
            h.register_hook(lambda grad, rec=rec: self._on_grad(rec, grad))
        else:
            h.register_hook(lambda grad, rec=rec, rows=rows: self._on_grad(rec, take(grad, rows)))
        return h

    def _on_grad(self, rec: SiteRecord, grad: torch.Tensor) -> None:
        # Keep autograd's own tensor (not a detached alias), or a view of it: holding a reference to its
        # storage stops autograd from accumulating into it in place later in the backward pass.
        rec.delta = grad
        if self.on_delta is not None:
            self.on_delta(rec)
