"""``TenantBank``: many users' adapter sets (tenants) on one frozen base model.

Design:

* The bank wraps ONE model as loaded for the task (e.g. ``load_model("minilm", "seq_cls")``). Each tenant
  is an adapter set named after the tenant id, attached with the ordinary ``attach`` machinery, so every
  family works (mixed families across tenants too) and a tenant saves/loads in PEFT's format unchanged
  (``save_tenant`` writes what ``load_adapter`` and Hugging Face PEFT read).
* Each tenant owns its task head as a ``full`` adapter on the model's head module (``classifier`` for
  BERT, ``score`` for Llama). ``head=N`` gives the tenant a fresh ``N``-output head, so tenants with
  different numbers of labels share one base: in a mixed batch the head output is zero-padded to the
  widest tenant's width, and a tenant's logits are ``logits[its rows, :N]`` (``TenantBank.logits``).
  Because the head is an adapter, the engines treat it like any other (no special case).
* A forward over a mixed batch runs inside ``bank.route(tenant_ids)``: that installs a
  ``TenantRouter`` on every site for the duration of the call, so each row gets its own tenant's
  adapters. Outside ``route`` the model behaves as a plain cotune model (active set, if any).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.adapters.attach import (
    adapter_sets,
    attach,
    copy_adapter_weights,
    detach,
    head_modules,
    match_targets,
    sites,
)
from cotune.adapters.base import Adapter, AdapterConfig
from cotune.adapters.io import load_weights, present_heads, read_adapter_config, save_adapter
from cotune.adapters.registry import get_family, make_config
from cotune.adapters.site import io_widths, take
from cotune.errors import CotuneError
from cotune.tenants.routing import BASE, RowGroups, TenantRouter

AdapterSpec = AdapterConfig | str | os.PathLike | Sequence[AdapterConfig | str]
HeadSpec = int | nn.Module | None


@dataclass
class Tenant:
    """One user's adapter set on the shared base."""

    id: str
    configs: list[AdapterConfig]
    #: path of the head module the tenant owns (``None``: the tenant uses the base model's head/output).
    head_path: str | None = None
    #: width of the tenant's head output (its number of labels), or ``None`` without an own head.
    num_labels: int | None = None
    source: str | None = None  # the folder it was loaded from, if any
    meta: dict[str, Any] = field(default_factory=dict)


class TenantBank:
    """Tenants (adapter sets + task heads) on one frozen base model; routes mixed batches row by row.

    ``gather``: batch same-shape low-rank tenants in one gathered matmul (default); ``False`` runs one
    matmul per tenant (the reference path).
    """

    def __init__(self, model: nn.Module, gather: bool = True) -> None:
        self.model = model
        self.gather = gather
        for p in model.parameters():
            p.requires_grad_(False)
        self._tenants: dict[str, Tenant] = {}

    # -- membership ----------------------------------------------------------------------------------
    @property
    def tenants(self) -> list[str]:
        """Tenant ids in the order they joined."""
        return list(self._tenants)

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self._tenants

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant(self, tenant_id: str) -> Tenant:
        """The ``Tenant`` record (error listing the known ids)."""
        if tenant_id not in self._tenants:
            raise CotuneError(f"unknown tenant {tenant_id!r}; tenants: {self.tenants or 'none'}")
        return self._tenants[tenant_id]

    def add_tenant(self, tenant_id: str, adapters: AdapterSpec, head: HeadSpec = None) -> Tenant:
        """Attach tenant ``tenant_id``'s adapter set: configs (or family names) or a saved adapter folder.

        ``head``: ``N`` gives the tenant its own fresh ``N``-output task head (a trainable ``full``
        adapter on the model's head module); an ``nn.Module`` is used as the head's template (copied);
        ``None`` keeps what ``adapters`` says (a folder saved with a head brings it back with its width).
        A saved adapter made for another base model is refused, naming every mismatched tensor; on any
        error the bank is left unchanged.
        """
        tid = str(tenant_id)
        if not tid:
            raise CotuneError("tenant id must be a non-empty string")
        if tid in self._tenants or tid in adapter_sets(self.model):
            raise CotuneError(f"tenant {tid!r} already exists; remove_tenant it first or choose another id")
        state: dict[str, torch.Tensor] | None = None
        source = None
        if isinstance(adapters, str | os.PathLike) and _is_folder(adapters):
            source = str(adapters)
            configs = present_heads(self.model, read_adapter_config(adapters))
            state = load_weights(adapters)
        else:
            items = [adapters] if isinstance(adapters, str | AdapterConfig) else list(adapters)  # type: ignore[arg-type]
            configs = [make_config(c) for c in items]
        head_path = self._head_path_of(configs) if head is None else self._head_path()
        if head is None and head_path is not None and state is not None:
            head = self._saved_head_width(head_path, state)
        if head is not None:
            head_path = head_path or self._head_path()
            configs = [c for c in configs if not self._targets_head(c, head_path)]
            configs.append(get_family("full").config_cls(target_modules=[head_path]))

        flags = [(p, p.requires_grad) for t in self._tenants for p in self.parameters(t).values()]
        try:
            attach(self.model, configs, name=tid, activate=False)  # validates everything before changing
        except Exception:
            self._restore_flags(flags)  # a family's prepare_base may fail after attach froze the model
            raise
        try:
            rewrites = sorted(p for p, s in sites(self.model).items() if tid in s.adapters and s.adapters[tid].changes_base())  # type: ignore[operator]
            if rewrites:  # detach() below restores the shared weights bit for bit
                raise CotuneError(
                    f"tenant {tid!r}: its adapters rewrite the shared base weights at {rewrites} (e.g. CoLA's "
                    "PiSSA residual), which would change every other tenant's model; use an init that leaves the "
                    "base alone (cola: init='lora')"
                )
            num_labels = None
            if head_path is not None:
                num_labels = self._install_head(tid, head_path, head)
            if state is not None:
                copy_adapter_weights(self.model, state, tid)
        except Exception as e:
            detach(self.model, tid)
            self._restore_flags(flags)
            if isinstance(e, CotuneError) and source is not None:
                raise CotuneError(f"tenant {tid!r} from {source}: {e}") from e
            raise
        self._restore_flags(flags)  # attach froze every other parameter, the other tenants' included
        rec = Tenant(tid, configs, head_path, num_labels, source)
        self._tenants[tid] = rec
        return rec

    def remove_tenant(self, tenant_id: str) -> None:
        """Detach the tenant's adapters and head; the other tenants are untouched."""
        self.tenant(tenant_id)
        detach(self.model, tenant_id)
        del self._tenants[tenant_id]

    # -- the tenant's weights --------------------------------------------------------------------------
    def adapters(self, tenant_id: str) -> dict[str, Adapter]:
        """``{site path: adapter}`` of the tenant (its head included)."""
        self.tenant(tenant_id)
        return {p: s.adapters[tenant_id] for p, s in sites(self.model).items() if tenant_id in s.adapters}  # type: ignore[misc]

    def parameters(self, tenant_id: str) -> dict[str, nn.Parameter]:
        """The tenant's parameters by ``<site path>.<param>`` (the keys ``save_tenant`` writes)."""
        return {f"{p}.{k}": v for p, ad in self.adapters(tenant_id).items() for k, v in ad.named_parameters()}

    def state_dict(self, tenant_id: str) -> dict[str, torch.Tensor]:
        """Detached copies of the tenant's parameters."""
        return {k: v.detach().clone() for k, v in self.parameters(tenant_id).items()}

    def set_trainable(self, trainable: bool, tenant_ids: Sequence[str] | None = None) -> None:
        """``requires_grad`` of the tenants' parameters (gradient learning keeps them read-only)."""
        for t in self.tenants if tenant_ids is None else tenant_ids:
            for p in self.parameters(t).values():
                p.requires_grad_(trainable)

    def save_tenant(self, tenant_id: str, folder: str | os.PathLike, base_model: str | None = None) -> Path:
        """Write the tenant's set in PEFT's format (loadable by ``add_tenant``, ``load_adapter``, PEFT);
        ``base_model``: the base model's name to record (default: the path it was loaded from)."""
        self.tenant(tenant_id)
        return save_adapter(self.model, folder, name=tenant_id, base_model=base_model)

    # -- mixed batches ---------------------------------------------------------------------------------
    @contextmanager
    def route(
        self,
        tenant_ids: Sequence[str] | RowGroups,
        gather: bool | None = None,
        merged: dict[str, torch.Tensor] | None = None,
        merged_tenants: dict[str, set[str]] | None = None,
    ) -> Iterator[TenantRouter]:
        """While open, every site applies each row's own tenant adapter (``tenant_ids``: one per row; ``BASE``
        rows get the frozen base model);
        ``merged`` / ``merged_tenants``: collaborative merged mode (see ``TenantRouter``)."""
        groups = tenant_ids if isinstance(tenant_ids, RowGroups) else RowGroups.from_ids(tenant_ids)
        unknown = sorted({t for t, _ in groups.groups if t not in self._tenants and t != BASE})
        if unknown:
            raise CotuneError(f"rows name unknown tenant(s) {unknown}; tenants: {self.tenants or 'none'}")
        router = TenantRouter(groups, self.gather if gather is None else gather, merged, merged_tenants)
        all_sites = list(sites(self.model).values())
        previous = [s.router for s in all_sites]
        for s in all_sites:
            s.router = router
        try:
            yield router
        finally:
            for s, r in zip(all_sites, previous, strict=True):
                s.router = r

    def forward(self, tenant_ids: Sequence[str] | RowGroups, *args: Any, **inputs: Any) -> Any:
        """``model(*args, **inputs)`` on a mixed batch (one tenant id per row)."""
        with self.route(tenant_ids):
            return self.model(*args, **inputs)

    def logits(self, output: Any, groups: RowGroups, tenant_id: str) -> torch.Tensor:
        """The tenant's rows of the model output, cut to its own head width (its ``num_labels``)."""
        logits = output.logits if hasattr(output, "logits") else output
        rows = take(logits, groups.rows_of(tenant_id))
        n = self.tenant(tenant_id).num_labels
        if n is None and logits.dim() == 2:  # no own head: the base head's width (others may be wider)
            try:
                n = io_widths(self._base_module(self._head_path()))[1]
            except CotuneError:
                n = None
        return rows if n is None else rows[..., :n]

    # -- internals -------------------------------------------------------------------------------------
    def _head_path(self) -> str:
        try:
            paths = head_modules(self.model)
        except CotuneError as e:
            raise CotuneError(
                f"this model has no known task-head module for a per-tenant head ({e}); load the base for "
                "its task (e.g. load_model(..., 'seq_cls')) or pass head=None"
            ) from e
        if len(paths) != 1:
            raise CotuneError(f"expected one task-head module, found {paths}")
        return paths[0]

    def _targets_head(self, cfg: AdapterConfig, head_path: str) -> bool:
        if cfg.family != "full":
            return False
        try:
            targets = cfg.target_modules if cfg.target_modules is not None else head_modules(self.model)
            return head_path in match_targets(self.model, targets)
        except CotuneError:
            return False

    def _head_path_of(self, configs: list[AdapterConfig]) -> str | None:
        try:
            hp = self._head_path()
        except CotuneError:
            return None
        return hp if any(self._targets_head(c, hp) for c in configs) else None

    def _saved_head_width(self, head_path: str, state: dict[str, torch.Tensor]) -> int | None:
        w = state.get(f"{head_path}.weight")
        base = self._base_module(head_path)
        if w is None or w.dim() != 2 or not isinstance(base, nn.Linear) or w.shape[0] == base.out_features:
            return None
        return int(w.shape[0])

    def _base_module(self, path: str) -> nn.Module:
        mod = self.model.get_submodule(path)
        return getattr(mod, "base", mod)

    def _install_head(self, tid: str, head_path: str, head: HeadSpec) -> int:
        """Give the tenant its own head at ``head_path`` (replacing the copy ``attach`` made)."""
        site = self.model.get_submodule(head_path)
        base = site.base  # type: ignore[union-attr]
        if head is None:
            return io_widths(base)[1]
        if isinstance(head, int):
            if head < 1:
                raise CotuneError(f"head must have at least one output, got head={head}")
            if not isinstance(base, nn.Linear):
                raise CotuneError(f"head=N needs an nn.Linear head module; {head_path} is {type(base).__name__}")
            template: nn.Module = nn.Linear(base.in_features, head, bias=base.bias is not None)
            std = float(getattr(getattr(self.model, "config", None), "initializer_range", 0.02))
            nn.init.normal_(template.weight, std=std)  # transformers' own head init
            if template.bias is not None:
                nn.init.zeros_(template.bias)
        elif isinstance(head, nn.Module):
            template = head
        else:
            raise CotuneError(f"head must be an int (number of outputs), an nn.Module or None; got {head!r}")
        d_in, d_out = io_widths(template)
        if d_in != io_widths(base)[0]:
            raise CotuneError(f"head takes {d_in} inputs but {head_path} receives {io_widths(base)[0]}")
        old = site.adapters[tid]  # type: ignore[index]
        new = type(old)(old.config, d_in, d_out, template)
        ref = next(iter(base.parameters()), None)
        if ref is not None:  # the dtype rule of ``attach``: the base's when it is float64, else fp32
            new.to(ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        for p in new.parameters():
            p.requires_grad_(True)
        site.adapters[tid] = new  # type: ignore[index]
        return d_out

    @staticmethod
    def _restore_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
        for p, flag in flags:
            p.requires_grad_(flag)


def _is_folder(x: str | os.PathLike) -> bool:
    p = Path(x).expanduser()
    if p.is_dir():
        return True
    if isinstance(x, os.PathLike) or "/" in str(x) or str(x).startswith("."):
        raise CotuneError(f"adapter folder {str(x)!r} does not exist")
    return False
