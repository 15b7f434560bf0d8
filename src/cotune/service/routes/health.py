"""``GET /healthz``: liveness and the runner's state, without authentication."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cotune.service.routes.deps import ConfigDep, RunnerDep

router = APIRouter(tags=["service"])


@router.get("/healthz")
def healthz(config: ConfigDep, runner: RunnerDep) -> dict[str, Any]:
    """Liveness: the runner's state (no authentication)."""
    return {"ok": True, "model": config.model, "runner": runner.describe()}
