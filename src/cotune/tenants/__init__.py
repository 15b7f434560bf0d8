"""Many tenants on one base model (DESIGN §4): the tenant bank, per-row routing, mixed-batch training."""

from cotune.tenants.bank import Tenant, TenantBank
from cotune.tenants.engine import MultiTenantTrainer, TenantStep, causal_lm_loss, classification_loss
from cotune.tenants.routing import RowGroups, TenantRouter, gathered_lowrank
from cotune.tenants.scheduler import MixedBatch, MixedBatchScheduler

__all__ = [
    "MixedBatch",
    "MixedBatchScheduler",
    "MultiTenantTrainer",
    "RowGroups",
    "Tenant",
    "TenantBank",
    "TenantRouter",
    "TenantStep",
    "causal_lm_loss",
    "classification_loss",
    "gathered_lowrank",
]
