"""Many tenants on one base model: the tenant bank, per-row routing, mixed-batch training."""

from cotune.tenants.bank import Tenant, TenantBank
from cotune.tenants.generation import DecodeRequest, decode
from cotune.tenants.routing import BASE, RowGroups, TenantRouter, gathered_lowrank
from cotune.tenants.scheduler import MixedBatch, MixedBatchScheduler
from cotune.tenants.trainer import MultiTenantTrainer, TenantLoss

__all__ = [
    "BASE",
    "DecodeRequest",
    "MixedBatch",
    "MixedBatchScheduler",
    "MultiTenantTrainer",
    "RowGroups",
    "Tenant",
    "TenantBank",
    "TenantLoss",
    "TenantRouter",
    "decode",
    "gathered_lowrank",
]
