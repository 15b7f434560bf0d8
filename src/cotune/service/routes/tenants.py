"""``/v1/tenants``: register a tenant (with the server's admin token) and describe the caller's own."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException

from cotune.service.auth import check_admin, issue_token
from cotune.service.routes.deps import ConfigDep, StoreDep, Tenant
from cotune.service.schemas import RegisterRequest, RegisterResponse

router = APIRouter(tags=["tenants"])


@router.post("/v1/tenants", response_model=RegisterResponse, status_code=201)
def register(
    body: RegisterRequest, store: StoreDep, config: ConfigDep, x_admin_token: Annotated[str | None, Header()] = None
) -> RegisterResponse:
    """Register a tenant; returns its token once (only its hash is stored)."""
    if not check_admin(config.admin_token, x_admin_token):
        raise HTTPException(403, "registration needs the server's admin token in 'X-Admin-Token'")
    tid, token = issue_token(store, body.name)
    return RegisterResponse(tenant_id=tid, token=token)


@router.get("/v1/tenants/me")
def me(tid: Tenant, store: StoreDep) -> dict[str, Any]:
    t = store.tenant(tid) or {}
    return {"tenant_id": tid, "name": t.get("name"), "created": t.get("created")}
