"""Admin endpoints: ``/admin/reload`` (hot swap to another model version) and ``/admin/keys``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kem.server.protocol import KeyRequest, ReloadRequest
from kem.server.routes.deps import admin, json_body, keys, parse, serving

router = APIRouter()


@router.post("/admin/reload")
async def reload(request: Request) -> dict[str, Any]:
    admin(request)
    return await serving(request).reload(parse(ReloadRequest, await request.body(), "ReloadRequest"))


@router.get("/admin/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    admin(request)
    return {"object": "list", "data": keys(request).list()}


@router.post("/admin/keys", status_code=201)
async def create_key(request: Request) -> Response:
    admin(request)
    req = KeyRequest.from_body(await json_body(request))
    key = keys(request).create(req.namespace, req.admin, limits=req.limits, review=req.review)
    return JSONResponse(req.created(key), status_code=201)


@router.delete("/admin/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    admin(request)
    return {"object": "api_key.deleted", "revoked": keys(request).revoke(key_id)}
