"""Liveness and readiness for orchestrators and load balancers."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from chat_service.db import ping
from chat_service.errors import ErrorBody
from chat_service.schemas import HealthStatus

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

READINESS_TIMEOUT_S = 2.0


class NotReady(ErrorBody):
    checks: dict[str, str]


@router.get("/healthz")
async def healthz() -> HealthStatus:
    """The process is alive."""
    return HealthStatus(status="ok")


@router.get(
    "/readyz",
    responses={
        200: {"model": HealthStatus, "description": "Ready"},
        503: {"model": NotReady, "description": "Not ready: `checks` says what failed"},
    },
)
async def readyz(request: Request) -> JSONResponse:
    """The database and the broker are reachable: this instance can take traffic."""
    checks = {
        "database": "ok",
        "broker": "ok" if request.app.state.broker.healthy else "unavailable",
    }
    if request.app.state.lifecycle.draining:
        checks["shutdown"] = "draining"
    try:
        await asyncio.wait_for(ping(request.app.state.engine), READINESS_TIMEOUT_S)
    except Exception as exc:  # any failure means "not ready"; the reason goes to the log
        log.warning("readiness check failed", extra={"check": "database", "error": repr(exc)})
        checks["database"] = "unavailable"
    if all(value == "ok" for value in checks.values()):
        return JSONResponse(HealthStatus(status="ok", checks=checks).model_dump())
    failure = NotReady(detail="Not ready", code="unavailable", checks=checks)
    return JSONResponse(failure.model_dump(), status_code=503)
