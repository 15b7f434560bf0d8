"""Per-tenant fitters for gradient learning across tenants: a thin adapter over the gl engine's pieces.

Each tenant gets the gradient-learning engine's own ``FitterHandle`` (``make_fitter``: inline, thread,
worker process or Ray actor; the fitter owns the tenant's trainable copies, optimizer and schedule and
writes the new weights back to the server's read-only adapters) and its own ``Wire`` (fp32/bf16 on the
wire, the exact sufficient statistic ``Σ δ uᵀ`` for affine adapters, byte counters). What this module adds
is only the hand-over: the tenant's captured ``(u, δ)`` of one mixed step become that engine's
``SiteRecord``s, numbered per site by call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from cotune.adapters.base import Adapter
from cotune.engines.base import OptimConfig
from cotune.engines.gradient_learning import SiteRecord, Wire, affine_in_u, make_fitter
from cotune.errors import CotuneError

#: one captured call of one tenant's site: (site path, u, δ, seed of the server's draws, training flag)
Record = tuple[str, torch.Tensor, torch.Tensor, int | None, bool]


class TenantFitter:
    """One tenant's fitter at ``placement``; ``fit(records)`` = ship every pair, then one optimizer step."""

    def __init__(
        self,
        tenant: str,
        adapters: dict[str, Adapter],
        optim: OptimConfig,
        placement: str = "inline",
        wire_dtype: str = "fp32",
        sufficient_statistic: str = "auto",
        timeout_s: float = 120.0,
        **placement_options: Any,
    ) -> None:
        self.tenant = tenant
        self.adapters = adapters
        statistic = {} if sufficient_statistic == "off" else {p: affine_in_u(ad) for p, ad in adapters.items()}
        self.wire = Wire(wire_dtype, statistic, sufficient_statistic)
        self.handle = make_fitter(placement, adapters, optim, timeout_s=timeout_s, name=tenant, **placement_options)

    def submit(self, records: Sequence[Record]) -> None:
        """Ship the tenant's pairs of this step (a thread/process fitter starts on them at once)."""
        calls: Counter[str] = Counter()
        try:
            for path, u, delta, seed, training in records:
                ad = self.adapters.get(path)
                if ad is None:
                    raise CotuneError(f"tenant {self.tenant!r} has no adapter at {path!r}")
                rec = SiteRecord(path, calls[path], self.tenant, u, seed, training, delta, u._version)
                calls[path] += 1
                self.handle.submit(self.wire.pack(rec, ad))
        except BaseException:
            self.handle.discard()
            raise

    def step(self) -> tuple[bool, str | None, dict[str, float]]:
        """The one optimizer step of this step's pairs: ``(updated, reason if not, stats)``."""
        res = self.handle.step()
        stats = self.wire.counters()
        self.wire.reset()
        stats.update({k: float(res[k]) for k in ("grad_norm", "fit_s") if k in res})
        updated = bool(res["updated"])
        return updated, None if updated else f"non-finite gradient (norm {res.get('grad_norm')})", stats

    def discard(self) -> None:
        self.handle.discard()
        self.wire.reset()

    def state_dict(self) -> dict[str, Any]:
        return self.handle.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.handle.load_state_dict(state)

    def close(self) -> None:
        self.handle.close()
