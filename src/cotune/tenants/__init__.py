"""Many tenants on one base model: the tenant bank, per-row routing, mixed-batch training."""

from cotune.tenants.bank import Tenant, TenantBank
from cotune.tenants.routing import RowGroups, TenantRouter, gathered_lowrank
from cotune.tenants.scheduler import MixedBatch, MixedBatchScheduler
from cotune.tenants.trainer import MultiTenantTrainer, TenantLoss

__all__ = [
    "MixedBatch",
    "MixedBatchScheduler",
    "MultiTenantTrainer",
    "RowGroups",
    "Tenant",
    "TenantBank",
    "TenantLoss",
    "TenantRouter",
    "gathered_lowrank",
]
