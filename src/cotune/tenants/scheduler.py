"""Fair-share mixed batches from many tenants' data streams.

Every step, each active tenant contributes its own fixed number of rows (``rows_per_step``, e.g. 4), taken
in order from its stream; the rows are concatenated tenant after tenant (so each tenant's rows are one
contiguous block: views, no gathers) and the sequence dimension is padded to the longest row. Tenants
join or leave between steps; a tenant whose stream runs out (or reaches ``max_steps``) leaves on its own
and is listed in ``finished``.

A stream is any iterable of batches: dicts of tensors with rows on dim 0 (what a tokenizer returns, plus
``labels``). Batches are re-cut to ``rows_per_step`` rows, so a stream may yield single rows or big
chunks alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cotune.errors import CotuneError
from cotune.tenants.routing import RowGroups

Batch = dict[str, torch.Tensor]

#: Padding value per key when rows of different lengths are stacked (labels: ignored by the losses).
DEFAULT_PAD = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "labels": -100}


@dataclass
class MixedBatch:
    """One step's rows from several tenants.

    ``inputs``: the model inputs (every key but the target keys), rows of all tenants concatenated;
    ``targets``: ``{tenant: {key: tensor}}`` each tenant's own targets (``labels``), unpadded;
    ``groups``: the rows of each tenant (contiguous slices).
    """

    step: int
    groups: RowGroups
    inputs: Batch
    targets: dict[str, Batch]

    @property
    def tenants(self) -> list[str]:
        return [t for t, _ in self.groups.groups]

    @property
    def tenant_ids(self) -> list[str]:
        """One tenant id per row."""
        return list(self.groups.tenant_of_row)

    def split(self, max_rows: int) -> list[MixedBatch]:
        """Consecutive sub-batches of whole tenants, each at most ``max_rows`` rows (a tenant with more
        rows than that is a sub-batch of its own); a tenant's rows are never split."""
        chunks: list[list[tuple[str, Any]]] = [[]]
        size = 0
        for t, rows in self.groups.groups:
            n = _count(rows)
            if chunks[-1] and size + n > max_rows:
                chunks.append([])
                size = 0
            chunks[-1].append((t, rows))
            size += n
        if len(chunks) == 1:
            return [self]
        return [self.subset([t for t, _ in part]) for part in chunks]

    def subset(self, tenants: list[str]) -> MixedBatch:
        """The batch of ``tenants``' rows only, tenant after tenant (``self`` when that is every row)."""
        if tenants == self.tenants:
            return self
        parts = [(t, self.groups.rows_of(t)) for t in tenants]
        idx = torch.cat([_index(r) for _, r in parts])
        ids = [t for t, r in parts for _ in range(_count(r))]
        inputs = {k: v.index_select(0, idx) for k, v in self.inputs.items()}
        return MixedBatch(self.step, RowGroups.from_ids(ids), inputs, {t: self.targets[t] for t in tenants})

    def tenant_inputs(self, tenant: str) -> Batch:
        """The tenant's rows of the model inputs (what it would feed if trained alone)."""
        rows = self.groups.rows_of(tenant)
        return {k: v[rows] for k, v in self.inputs.items()}


@dataclass
class _Stream:
    source: Iterator[Batch]
    rows_per_step: int
    max_steps: int | None
    buffer: list[Batch] = field(default_factory=list)
    buffered: int = 0
    steps: int = 0
    exhausted: bool = False


class MixedBatchScheduler:
    """Builds fair-share mixed batches; tenants ``join``/``leave`` between steps.

    ``target_keys``: batch keys that are per-tenant targets (kept out of the model inputs; heads of
    different widths need their own). ``pad``: padding value per key for the sequence dimension.
    ``padding_side``: ``right`` (encoders) or ``left`` (decoders that read the last position).
    """

    def __init__(
        self,
        target_keys: Iterable[str] = ("labels",),
        pad: dict[str, int | float] | None = None,
        padding_side: str = "right",
    ) -> None:
        if padding_side not in ("right", "left"):
            raise CotuneError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.target_keys = tuple(target_keys)
        self.pad = {**DEFAULT_PAD, **(pad or {})}
        self.padding_side = padding_side
        self._streams: dict[str, _Stream] = {}
        self.finished: dict[str, str] = {}
        self.step = 0

    @property
    def active(self) -> list[str]:
        """Tenants that will contribute to the next batch, in join order."""
        return list(self._streams)

    def join(
        self, tenant_id: str, stream: Iterable[Batch], rows_per_step: int = 4, max_steps: int | None = None
    ) -> None:
        """Add a tenant's data stream; it contributes ``rows_per_step`` rows to every following batch."""
        if tenant_id in self._streams:
            raise CotuneError(f"tenant {tenant_id!r} already has a stream; leave() it first")
        if rows_per_step < 1:
            raise CotuneError(f"rows_per_step must be >= 1, got {rows_per_step}")
        self.finished.pop(tenant_id, None)
        self._streams[tenant_id] = _Stream(iter(stream), rows_per_step, max_steps)

    def leave(self, tenant_id: str, reason: str = "left") -> None:
        """Stop taking rows from the tenant (from the next batch on)."""
        if tenant_id not in self._streams:
            raise CotuneError(f"tenant {tenant_id!r} has no stream; active: {self.active or 'none'}")
        del self._streams[tenant_id]
        self.finished[tenant_id] = reason

    def next_batch(self) -> MixedBatch | None:
        """The next mixed batch, or ``None`` when no tenant has rows left."""
        parts: list[tuple[str, Batch]] = []
        for tid in list(self._streams):
            st = self._streams[tid]
            if st.max_steps is not None and st.steps >= st.max_steps:
                self.leave(tid, "max_steps")
                continue
            rows = self._take(tid, st)
            if rows is None:
                self.leave(tid, "exhausted")
                continue
            st.steps += 1
            parts.append((tid, rows))
        if not parts:
            return None
        batch = self.collate(parts)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[MixedBatch]:
        while (b := self.next_batch()) is not None:
            yield b

    # -- building a batch -----------------------------------------------------------------------------
    def _take(self, tid: str, st: _Stream) -> Batch | None:
        while st.buffered < st.rows_per_step and not st.exhausted:
            try:
                b = next(st.source)
            except StopIteration:
                st.exhausted = True
                break
            b = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in dict(b).items()}
            n = _rows(b, tid)
            if n:
                st.buffer.append(b)
                st.buffered += n
        if st.buffered == 0:
            return None
        take = min(st.rows_per_step, st.buffered)
        out: list[Batch] = []
        need = take
        while need:
            b = st.buffer[0]
            n = _rows(b, tid)
            if n <= need:
                out.append(st.buffer.pop(0))
                need -= n
            else:
                out.append({k: v[:need] for k, v in b.items()})
                st.buffer[0] = {k: v[need:] for k, v in b.items()}
                need = 0
        st.buffered -= take
        return self._stack(out) if len(out) > 1 else out[0]

    def _stack(self, parts: list[Batch]) -> Batch:
        keys = parts[0].keys()
        return {k: self._cat([p[k] for p in parts], k) for k in keys}

    def _cat(self, tensors: list[torch.Tensor], key: str) -> torch.Tensor:
        if tensors[0].dim() < 2:
            return torch.cat(tensors)
        length = max(t.shape[1] for t in tensors)
        value = self.pad.get(key, 0)
        padded = []
        for t in tensors:
            extra = length - t.shape[1]
            if extra:
                pad = [0, 0] * (t.dim() - 2) + ([0, extra] if self.padding_side == "right" else [extra, 0])
                t = F.pad(t, pad, value=value)
            padded.append(t)
        return torch.cat(padded)

    def collate(self, parts: list[tuple[str, Batch]]) -> MixedBatch:
        """Concatenate tenants' row blocks into one ``MixedBatch`` (targets kept per tenant)."""
        keys = [k for k in parts[0][1] if k not in self.target_keys]
        for tid, b in parts:
            if [k for k in b if k not in self.target_keys] != keys:
                raise CotuneError(f"tenant {tid!r} feeds inputs {sorted(b)}; the others feed {sorted(keys)}")
        inputs = {k: self._cat([b[k] for _, b in parts], k) for k in keys}
        targets = {tid: {k: v for k, v in b.items() if k in self.target_keys} for tid, b in parts}
        ids = [tid for tid, b in parts for _ in range(_rows(b, tid))]
        return MixedBatch(self.step, RowGroups.from_ids(ids), inputs, targets)

    def state(self) -> dict[str, Any]:
        """Counters for logs: steps per tenant, who finished and why."""
        return {"step": self.step, "active": {t: s.steps for t, s in self._streams.items()}, "finished": self.finished}


def _index(rows: slice | torch.Tensor) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows


def _count(rows: slice | torch.Tensor) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def _rows(b: Batch, tid: str) -> int:
    sizes = {int(v.shape[0]) for v in b.values() if v.dim() > 0}
    if len(sizes) != 1:
        raise CotuneError(f"tenant {tid!r}: batch tensors disagree on the number of rows: {sorted(sizes)}")
    return sizes.pop()
