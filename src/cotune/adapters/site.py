"""``AdaptedModule``: a base module plus named adapters, applied at the adapter's site (DESIGN §1).

Two hooks let the engines and the tenant bank work without knowing any family:

* ``tap(site, adapter, u, h, seed) -> h``: called with the adapter input ``u`` and the tensor ``h`` the
  adapter's contribution is added to; gradient learning registers a gradient hook on ``h`` here.
* ``router``: an object whose ``forward(site, x, *args, **kwargs)`` replaces this forward, so that each
  row of a mixed batch gets its own tenant's adapter (``cotune.tenants``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from cotune.adapters.base import Adapter
from cotune.errors import CotuneError

Tap = Callable[["AdaptedModule", Adapter, torch.Tensor, torch.Tensor, int | None], torch.Tensor]


class Router(Protocol):
    def forward(self, site: AdaptedModule, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor: ...


def io_widths(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a module an adapter can sit on: Linear, GPT-2 Conv1D, norms, Embedding."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is (d_in, d_out)
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:  # LayerNorm, RMSNorm
        return w.shape[0], w.shape[0]
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[1], w.shape[0]
    raise CotuneError(
        f"cannot attach an adapter to {type(module).__name__}: only Linear, Conv1D, Embedding and "
        "normalisation layers have known input/output widths"
    )


class AdaptedModule(nn.Module):
    """Wraps ``base`` (frozen) with named adapters; ``active`` names the one applied."""

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None  # name of the adapter folded into ``base``, if any
        self._pristine: dict[str, torch.Tensor] = {}
        self.tap: Tap | None = None
        self.router: Router | None = None
        self.d_in, self.d_out = io_widths(base)

    # -- forward -----------------------------------------------------------------------------------
    def current(self) -> Adapter | None:
        """The adapter the forward applies (``None``: none active, or it is merged into the base)."""
        if self.active is None or self.active == self.merged:
            return None
        return self.adapters[self.active]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.router is not None:
            return self.router.forward(self, x, *args, **kwargs)
        ad = self.current()
        if ad is None:
            return self.base(x, *args, **kwargs)
        return self.apply_adapter(ad, x, *args, **kwargs)

    def apply_adapter(self, ad: Adapter, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's forward with ``ad`` applied at its site (``h``), through the tap."""
        seed = random.getrandbits(62) if ad.training and ad.stochastic else None
        if ad.site == "replace":  # a float input sets the output dtype; integer ids (an embedding) cannot
            h = self.delta(ad, x, seed)
            h = h.to(x.dtype) if x.is_floating_point() else h
            return self._tapped(ad, x, h, seed)
        if ad.site == "pre":
            h = x + self.delta(ad, x, seed).to(x.dtype)
            return self.base(self._tapped(ad, x, h, seed), *args, **kwargs)
        y = self.base(x, *args, **kwargs)
        u = x if ad.site == "parallel" else y
        h = y + self.delta(ad, u, seed).to(y.dtype)
        return self._tapped(ad, u, h, seed)

    @staticmethod
    def delta(ad: Adapter, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """``s·g(u)`` in the adapter's ``compute_dtype`` (the caller casts): never below fp32 (DESIGN §2)."""
        return ad.scaling * ad(u.to(ad.compute_dtype) if u.is_floating_point() else u, seed=seed)

    def _tapped(self, ad: Adapter, u: torch.Tensor, h: torch.Tensor, seed: int | None) -> torch.Tensor:
        return h if self.tap is None else self.tap(self, ad, u, h, seed)

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the base weight; keeps the pristine copy."""
        name = name or self.active
        if name is None:
            raise CotuneError(f"{self.path}: no adapter to merge")
        if self.merged == name:
            return
        if self.merged is not None:
            self.unmerge()
        new = self.adapters[name].merged_state(self.base)  # type: ignore[operator]
        params = dict(self.base.named_parameters())
        with torch.no_grad():
            for k, v in new.items():
                self._pristine[k] = params[k].detach().clone()
                params[k].copy_(v)
        self.merged = name

    def unmerge(self) -> None:
        """Restore the base weights saved at ``merge`` (bit for bit)."""
        if self.merged is None:
            return
        params = dict(self.base.named_parameters())
        with torch.no_grad():
            for k, v in self._pristine.items():
                params[k].copy_(v)
        self._pristine.clear()
        self.merged = None

    def refresh_merge(self) -> None:
        """Re-fold the merged adapter after its weights changed, from the pristine base (no drift)."""
        name = self.merged
        if name is None:
            return
        self.unmerge()
        self.merge(name)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, adapters={list(self.adapters)}, active={self.active!r}"
