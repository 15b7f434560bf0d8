"""``AdaptedModule``: a base module plus named adapters, composed at the adapter's site (docs/DESIGN.md).

The site is the one place where an adapter's contribution is composed with the base module
(``adapt_input`` for *pre* sites, ``adapt_output`` for the others); a single job and a routed mixed
batch both go through it. Two hooks let the engines and the tenant bank work without knowing any family:

* ``taps[name](site, adapter, u, h, seed[, rows]) -> h``: per adapter set, called with the adapter input ``u``
  and the tensor ``h`` its contribution is added to (for a merged set, ``h`` is the module output); gradient
  learning registers a gradient hook on ``h`` here. ``rows`` is passed only when ``h`` is a whole mixed
  batch's tensor of which only these rows (``u``'s) are the set's: the router's one-add gathered path.
* ``router``: an object whose ``forward(site, x, *args, **kwargs)`` replaces this forward, so that each
  row of a mixed batch gets its own tenant's adapter (``cotune.tenants``); it calls back ``adapt_input``
  and ``adapt_output`` for each tenant's rows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from cotune.adapters.base import Adapter
from cotune.errors import CotuneError

#: the rows of one adapter set in a mixed batch: a ``slice`` (a view) or a ``LongTensor`` of row indices
Rows = slice | torch.Tensor
Tap = Callable[["AdaptedModule", Adapter, torch.Tensor, torch.Tensor, int | None, Rows | None], torch.Tensor]


def take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``x[rows]`` along dim 0: ``x`` itself when ``rows`` spans it (no slice node for autograd to undo), a
    view for any other slice, a gather for indices."""
    if isinstance(rows, slice):
        return x if rows.start in (0, None) and rows.stop == x.shape[0] and rows.step in (1, None) else x[rows]
    return x.index_select(0, rows.to(x.device))


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
    if isinstance(module, nn.modules.conv._ConvNd):
        # channels; only a module trained in place (the full family's "replace" site) may sit here: attach
        # refuses additive families, whose maps act on the last dimension, not on channels
        return module.in_channels, module.out_channels
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:  # LayerNorm, RMSNorm
        return w.shape[0], w.shape[0]
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[1], w.shape[0]
    raise CotuneError(
        f"cannot attach an adapter to {type(module).__name__}: only Linear, Conv1D, Embedding and "
        "normalisation layers (and, for the full family, convolutions) have known input/output widths"
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
        #: per adapter set name: the tap its engine installed (gradient learning's capture)
        self.taps: dict[str, Tap] = {}
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
        name = self.active
        if name is None:
            return self.base(x, *args, **kwargs)
        ad: Adapter = self.adapters[name]  # type: ignore[assignment]
        if name == self.merged:  # folded into the weight: the tap sees (x, module output)
            return self.tapped(name, ad, x, self.base(x, *args, **kwargs), None)
        seed = self.draw_seed(ad)
        x = self.adapt_input(name, ad, x, seed)
        y = None if ad.site == "replace" else self.base(x, *args, **kwargs)
        return self.adapt_output(name, ad, x, y, seed)

    @staticmethod
    def draw_seed(ad: Adapter) -> int | None:
        """A fresh seed for one call of a stochastic adapter in training mode (``None`` otherwise)."""
        return random.getrandbits(62) if ad.training and ad.stochastic else None

    def adapt_input(self, name: str, ad: Adapter, x: torch.Tensor, seed: int | None) -> torch.Tensor:
        """What the base module sees: ``x + s·g(x)`` at a *pre* site, ``x`` otherwise."""
        if ad.site != "pre":
            return x
        return self.tapped(name, ad, x, x + self.delta(ad, x, seed).to(x.dtype), seed)

    def adapt_output(
        self,
        name: str,
        ad: Adapter,
        x: torch.Tensor,
        y: torch.Tensor | None,
        seed: int | None,
        delta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The site's output from its input ``x`` and the base output ``y`` (``None`` at a *replace* site).

        *parallel*: ``y + s·g(x)``; *sequential*: ``y + s·g(y)``; *replace*: ``g(x)``; *pre*: ``y``.
        ``delta``: ``s·g(u)`` already computed (the router's gathered low-rank matmul).
        """
        if ad.site == "pre":
            assert y is not None
            return y
        if ad.site == "replace":  # a float input sets the output dtype; integer ids (an embedding) cannot
            h = self.delta(ad, x, seed) if delta is None else delta
            return self.tapped(name, ad, x, h.to(x.dtype) if x.is_floating_point() else h, seed)
        assert y is not None
        u = x if ad.site == "parallel" else y
        d = self.delta(ad, u, seed) if delta is None else delta
        return self.tapped(name, ad, u, y + d.to(y.dtype), seed)

    @staticmethod
    def delta(ad: Adapter, u: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """``s·g(u)`` in the adapter's ``compute_dtype`` (the caller casts): never below fp32."""
        return ad.scaling * ad(u.to(ad.compute_dtype) if u.is_floating_point() else u, seed=seed)

    def tapped(
        self, name: str, ad: Adapter, u: torch.Tensor, h: torch.Tensor, seed: int | None, rows: Rows | None = None
    ) -> torch.Tensor:
        """``h`` through set ``name``'s tap, if it has one (``rows``: see ``taps``)."""
        tap = self.taps.get(name)
        if tap is None:
            return h
        return tap(self, ad, u, h, seed) if rows is None else tap(self, ad, u, h, seed, rows)

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
