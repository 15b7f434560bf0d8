"""``/v1/tenants``: register a tenant (with the server's admin token), describe the caller's own, rotate its token,
and (admin) revoke a tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Response

from cotune.service.auth import REVOKED, check_admin, issue_token, rotate_token
from cotune.service.routes.deps import ConfigDep, StoreDep, Tenant
from cotune.service.routes.jobs import compute_of
from cotune.service.schemas import RegisterRequest, RegisterResponse

router = APIRouter(tags=["tenants"])


@router.post("/v1/tenants", response_model=RegisterResponse, status_code=201)
def register(
    body: RegisterRequest, store: StoreDep, config: ConfigDep, x_admin_token: Annotated[str | None, Header()] = None
) -> RegisterResponse:
    """Register a tenant; returns its token once (only its hash is stored)."""
    if config.admin_token is None and not config.open_registration:
        raise HTTPException(403, "registration is closed on this server: its operator starts it with "
                                 "--open-registration, or with --admin-token and registers tenants with that token")
    if not check_admin(config.admin_token, x_admin_token):
        raise HTTPException(403, "registration needs the server's admin token in 'X-Admin-Token'")
    tid, token = issue_token(store, body.name)
    return RegisterResponse(tenant_id=tid, token=token)


@router.get("/v1/tenants/me")
def me(tid: Tenant, store: StoreDep, config: ConfigDep) -> dict[str, Any]:
    """The caller's tenant, with its storage and compute use beside this server's quotas (``None``: no quota)."""
    t = store.tenant(tid) or {}
    used, planned = compute_of(store, tid)
    return {"tenant_id": tid, "name": t.get("name"), "created": t.get("created"),
            "storage_bytes": store.usage(tid), "storage_quota_bytes": config.tenant_storage_bytes,
            "compute_tokens": used, "compute_tokens_planned": planned,
            "compute_quota_tokens": config.tenant_compute_tokens}


@router.post("/v1/tenants/me/token", response_model=RegisterResponse)
def rotate(tid: Tenant, store: StoreDep) -> RegisterResponse:
    """A new token for the caller; the one used for this request stops working at once."""
    return RegisterResponse(tenant_id=tid, token=rotate_token(store, tid))


@router.post("/v1/tenants/{tenant_id}/revoke", status_code=204)
def revoke(tenant_id: str, store: StoreDep, config: ConfigDep,
           x_admin_token: Annotated[str | None, Header()] = None) -> Response:
    """(admin) Lock a tenant out: its token stops working; its jobs, files and adapters stay until deleted."""
    if not config.admin_token or not check_admin(config.admin_token, x_admin_token):
        raise HTTPException(403, "revoking a tenant needs the server's admin token in 'X-Admin-Token'")
    if store.tenant(tenant_id) is None:
        raise HTTPException(404, f"no tenant {tenant_id!r}")
    store.set_token_hash(tenant_id, REVOKED)
    return Response(status_code=204)
