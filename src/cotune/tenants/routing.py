"""Per-row adapter choice for mixed batches: the router picks each row's adapters, the site composes them.

A mixed batch carries one tenant id per row. ``TenantRouter`` is installed as the ``router`` of every
``AdaptedModule`` while a mixed batch runs; at each site it

1. groups the rows by tenant (``RowGroups``, computed once per batch),
2. hands each tenant's rows to the site's own composition (``AdaptedModule.adapt_input`` /
   ``adapt_output``: the one place where pre / parallel / sequential / replace are defined), whatever the
   family (one module may hold a sequential kron adapter for one tenant and a parallel low-rank one for
   another),
3. runs the frozen base module ONCE for the whole batch (rows of a pre-site tenant see their modified
   input; rows whose tenant has no adapter at this site get the plain base output),
4. batches the tenants whose adapters declare a low-rank form (``Adapter.lowrank_factors()``) and share
   its shapes into one gathered matmul (``torch.bmm`` over the stacked ``A``/``B`` indexed by row).

Every tenant's contribution still goes through the site's tap of that tenant's set with that tenant's
rows (as its own slice of the output, or, on the one-add path, as ``rows`` of the whole output), so
gradient learning captures ``(u, δ)`` already split by tenant.

The base module must act row-wise on dim 0 (Linear, Conv1D, norms, Embedding do), which is also what
makes a tenant's result in a mixed batch equal to its result alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotune.adapters.base import Adapter
from cotune.adapters.site import AdaptedModule, Rows, take
from cotune.errors import CotuneError

#: the tenant id of rows that run through the frozen base model alone (no tenant may take this id)
BASE = ""


@dataclass
class RowGroups:
    """The rows of a mixed batch grouped by tenant.

    ``groups``: ``(tenant, rows)`` in order of first appearance; ``rows`` is a ``slice`` when the tenant's
    rows are contiguous (a view, no copy) and a ``LongTensor`` of row indices otherwise. ``contiguous``:
    every group is a slice and together they cover ``0..n_rows`` in order (what the scheduler builds).
    """

    n_rows: int
    groups: list[tuple[str, Rows]]
    contiguous: bool
    tenant_of_row: list[str] = field(repr=False)

    @classmethod
    def from_ids(cls, tenant_ids: Sequence[str]) -> RowGroups:
        """Group ``tenant_ids`` (one per row)."""
        ids = [str(t) for t in tenant_ids]
        if not ids:
            raise CotuneError("a mixed batch needs at least one row")
        order: dict[str, list[int]] = {}
        for i, t in enumerate(ids):
            order.setdefault(t, []).append(i)
        groups: list[tuple[str, Rows]] = []
        contiguous = True
        expected_start = 0
        for t, idx in order.items():
            if idx[-1] - idx[0] + 1 == len(idx):
                groups.append((t, slice(idx[0], idx[-1] + 1)))
                contiguous = contiguous and idx[0] == expected_start
                expected_start = idx[-1] + 1
            else:
                groups.append((t, torch.tensor(idx, dtype=torch.long)))
                contiguous = False
        return cls(len(ids), groups, contiguous, ids)

    def rows_of(self, tenant: str) -> Rows:
        """The rows of ``tenant`` (error when it has none in this batch)."""
        for t, r in self.groups:
            if t == tenant:
                return r
        raise CotuneError(f"tenant {tenant!r} has no rows in this batch; present: {[t for t, _ in self.groups]}")


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def assemble(
    groups: RowGroups, base: torch.Tensor | None, pieces: dict[str, torch.Tensor], like: torch.Tensor
) -> torch.Tensor:
    """One batch tensor whose rows of tenant ``t`` are ``pieces[t]`` and whose other rows are ``base``'s.

    Pieces may be narrower or wider than ``base`` in the last dim (task heads with different numbers of
    labels): everything is zero-padded to the widest. Differentiable w.r.t. ``base`` and every piece.
    """
    widths = [p.shape[-1] for p in pieces.values()] + ([base.shape[-1]] if base is not None else [])
    width = max(widths)
    if groups.contiguous:
        parts = []
        for t, rows in groups.groups:
            if t in pieces:
                parts.append(_pad_last(pieces[t], width))
            else:
                if base is None:
                    raise CotuneError("internal: rows without a piece and no base output")
                parts.append(_pad_last(base[rows], width))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # one tenant: its piece, not a copy
    if base is not None:
        out = _pad_last(base, width)
    else:
        shape = (groups.n_rows, *next(iter(pieces.values())).shape[1:-1], width)
        out = like.new_zeros(shape)
    for t, rows in groups.groups:
        if t not in pieces:
            continue
        idx = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        out = out.index_copy(0, idx.to(out.device), _pad_last(pieces[t], width).to(out.dtype))
    return out


def lowrank_key(ad: Adapter) -> tuple[Any, ...] | None:
    """The key under which an adapter shares a gathered matmul (``None``: it declares no low-rank form)."""
    factors = ad.lowrank_factors()
    if factors is None:
        return None
    a, b = factors
    return (tuple(a.shape), tuple(b.shape), a.device, ad.compute_dtype)


def gathered_lowrank(x: torch.Tensor, row_tenant: torch.Tensor, ads: Sequence[Adapter]) -> torch.Tensor:
    """``s_k B_k A_k x_i`` for every row ``i`` with ``k = row_tenant[i]``, as ONE pair of ``bmm`` calls.

    ``x``: ``(n, ..., d_in)``; returns ``(n, ..., d_out)`` in the adapters' compute dtype. The tenants'
    factors are stacked on every call (a few KB per tenant): that keeps autograd flowing to each tenant's
    own parameters (backprop) and always reads the current weights (gradient learning updates them in
    place off the server).
    """
    dtype = ads[0].compute_dtype
    factors = [ad.lowrank_factors() for ad in ads]
    a = torch.stack([f[0].to(dtype) for f in factors])  # type: ignore[index]  # (K, r, d_in)
    scale = torch.tensor([float(ad.scaling) for ad in ads], dtype=dtype, device=a.device)
    b = torch.stack([f[1].to(dtype) for f in factors]) * scale.view(-1, 1, 1)  # type: ignore[index]  # (K, d_out, r)
    n = x.shape[0]
    u = x.to(dtype).reshape(n, -1, x.shape[-1])  # (n, T, d_in)
    row_tenant = row_tenant.to(a.device)
    z = torch.bmm(u, a.index_select(0, row_tenant).transpose(1, 2))  # (n, T, r)
    out = torch.bmm(z, b.index_select(0, row_tenant).transpose(1, 2))  # (n, T, d_out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class TenantRouter:
    """The ``AdaptedModule.router`` of a tenant bank: applies each row's own tenant adapter.

    ``gather``: batch same-shape low-rank tenants in one gathered matmul (``False``: one matmul per
    tenant, the reference the gathered path is tested against). ``merged``: optional ``{site path: ΔW}``
    added to the base weight for ALL rows instead of routing the mergeable adapters (ColA's collaborative
    merged mode); ``merged_tenants[site path]`` are the tenants that ``ΔW`` covers there: their rows are
    tapped with ``(x, merged output)`` so that each still learns its own adapter.
    """

    def __init__(
        self,
        groups: RowGroups,
        gather: bool = True,
        merged: dict[str, torch.Tensor] | None = None,
        merged_tenants: dict[str, set[str]] | None = None,
    ):
        self.groups = groups
        self.gather = gather
        self.merged = merged or {}
        self.merged_tenants = merged_tenants or {}

    # -- one site ----------------------------------------------------------------------------------
    def forward(self, site: AdaptedModule, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        g = self.groups
        if x.shape[0] != g.n_rows:
            raise CotuneError(
                f"{site.path}: input has {x.shape[0]} rows on dim 0 but the mixed batch has {g.n_rows}; "
                "per-row routing needs batch-first activations (this module reshapes its batch)"
            )
        covered = self.merged_tenants.get(site.path, set())
        plan = [(t, rows, site.adapters[t]) for t, rows in g.groups if t in site.adapters and t not in covered]
        if not plan and site.path not in self.merged:
            return site.base(x, *args, **kwargs)
        seeds = {t: site.draw_seed(ad) for t, _, ad in plan}  # type: ignore[arg-type]

        # 1. pre sites: the module sees x + s·g(x) on those rows.
        pre = {t: site.adapt_input(t, ad, take(x, r), seeds[t]) for t, r, ad in plan if ad.site == "pre"}
        x_in = assemble(g, x, pre, x) if pre else x

        # 2. one base call for the whole batch (skipped when every row's module is replaced).
        replaced = sum(ad.site == "replace" for _, _, ad in plan)
        y = self._base(site, x_in, *args, **kwargs) if replaced < len(g.groups) else None

        # 3. the gathered low-rank matmul, as one add when it covers every row: a tenant's tap then pairs its
        #    own rows of the whole output (no per-tenant slices, sums and concatenation for autograd to undo).
        out = [(t, r, ad) for t, r, ad in plan if ad.site != "pre"]
        deltas: dict[str, torch.Tensor] = {}
        if self.gather:
            for members in _buckets(out):
                ads = [ad for _, _, ad in members]
                if y is not None and len(members) == len(plan) == len(g.groups) and g.contiguous:
                    h = y + gathered_lowrank(x, _row_index(g, [t for t, _, _ in members]), ads).to(y.dtype)
                    for t, r, ad in members:
                        h = site.tapped(t, ad, take(x, r), h, seeds[t], r)
                    return h
                sub_rows, row_tenant, spans = _bucket_rows(g, members)
                d_all = gathered_lowrank(x if sub_rows is None else take(x, sub_rows), row_tenant, ads)
                deltas.update({t: take(d_all, span) for (t, _, _), span in zip(members, spans, strict=True)})

        # 4. each tenant's output composed by the site; covered tenants tapped on the merged output.
        pieces = {
            t: site.adapt_output(t, ad, take(x, r), None if y is None else take(y, r), seeds[t], deltas.get(t))  # type: ignore[arg-type]
            for t, r, ad in out
        }
        for t, rows in g.groups:
            if t in covered:
                assert y is not None
                pieces[t] = site.tapped(t, site.adapters[t], take(x, rows), take(y, rows), None)  # type: ignore[arg-type]
        if not pieces:  # only pre-site tenants (or only the merged ΔW) here
            return y  # type: ignore[return-value]
        return assemble(g, y, pieces, x)

    def _base(self, site: AdaptedModule, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dw = self.merged.get(site.path)
        if dw is None:
            return site.base(x, *args, **kwargs)
        base = site.base
        if not isinstance(base, nn.Linear):
            raise CotuneError(f"{site.path}: collaborative merged mode needs an nn.Linear base module")
        w = (base.weight.to(dw.dtype) + dw).to(base.weight.dtype)
        return F.linear(x, w, base.bias)


def _buckets(plan: list[tuple[str, Rows, Adapter]]) -> list[list[tuple[str, Rows, Adapter]]]:
    """The tenants that can share a gathered matmul, by shape (buckets of two or more)."""
    buckets: dict[Any, list[tuple[str, Rows, Adapter]]] = {}
    for item in plan:
        key = lowrank_key(item[2])
        if key is not None:
            buckets.setdefault(key, []).append(item)
    return [m for m in buckets.values() if len(m) > 1]


def _row_index(g: RowGroups, tenants: list[str]) -> torch.Tensor:
    """Each row's position in ``tenants`` (every row's tenant must be listed)."""
    pos = {t: i for i, t in enumerate(tenants)}
    return torch.tensor([pos[t] for t in g.tenant_of_row], dtype=torch.long)


def _bucket_rows(
    g: RowGroups, members: list[tuple[str, Rows, Adapter]]
) -> tuple[Rows | None, torch.Tensor, list[Rows]]:
    """The rows of a bucket (``None``: all rows, in order), each row's tenant index, each tenant's span.

    When the bucket covers the whole batch the original row order is kept, so each tenant's span is its
    own ``rows``; otherwise the bucket's rows are gathered tenant after tenant and spans are consecutive.
    """
    if len(members) == len(g.groups):
        return None, _row_index(g, [t for t, _, _ in members]), [rows for _, rows, _ in members]
    idx, tenant_idx, spans, start = [], [], [], 0
    for k, (_, rows, _) in enumerate(members):
        r = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        idx.append(r)
        tenant_idx.append(torch.full((len(r),), k, dtype=torch.long))
        spans.append(slice(start, start + len(r)))
        start += len(r)
    return torch.cat(idx), torch.cat(tenant_idx), spans
