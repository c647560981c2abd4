"""``/healthz`` (what is served, for admins when auth is on) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from kem.errors import KemError
from kem.server.routes.deps import admin, keys, principal, serving

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    # with auth on, only admins see what is served (model, absorbed versions, fast path)
    if keys(request).enabled:
        try:
            if not principal(request).admin:
                return {"status": "ok"}
        except KemError:
            return {"status": "ok"}
    return serving(request).health()


@router.get("/metrics")
async def metrics_text(request: Request) -> Response:
    if keys(request).enabled:  # labels name namespaces: only admins (a scraper with an admin bearer token)
        admin(request)
    return PlainTextResponse(serving(request).metrics.render(), media_type="text/plain; version=0.0.4")
