"""The edits API (``/v1/edits``) and the audit log (``/v1/audit``), over :class:`kem.server.edits.Edits`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kem.server.edits import Edits
from kem.server.routes.deps import json_body, namespace, principal, serving

router = APIRouter()


def _edits(request: Request) -> Edits:
    return serving(request).edits


@router.post("/v1/edits", status_code=201)
async def create_edit(request: Request) -> Response:
    p = principal(request)
    body = await json_body(request)
    return JSONResponse(await _edits(request).create(p, body, request.headers.get("x-kem-namespace"),
                                                     request.query_params.get("on_conflict")), status_code=201)


@router.post("/v1/edits/import", status_code=201)
async def import_edits(request: Request) -> Response:
    p = principal(request)
    out = await _edits(request).import_edits(p, await request.body(), request.headers.get("content-type", ""),
                                             request.headers.get("x-kem-namespace"),
                                             request.query_params.get("on_conflict") or "supersede")
    return JSONResponse(out.model_dump(), status_code=201)


@router.get("/v1/edits")
async def list_edits(request: Request, limit: int = 50, offset: int = 0, status: str | None = None,
                     as_of: str | None = None, q: str | None = None, subject: str | None = None) -> dict[str, Any]:
    p = principal(request)
    page = await _edits(request).list(p, namespace(request), limit=limit, offset=offset, status=status,
                                      as_of=as_of, q=q, subject=subject)
    return page.model_dump()


@router.get("/v1/edits/search")
async def search_edits(request: Request, q: str = "", k: int = 20) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).search(p, q, namespace(request), k=k)


@router.post("/v1/edits/{edit_id}/approve")
async def approve_edit(edit_id: str, request: Request) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).review(p, edit_id, True, namespace(request), request.query_params.get("on_conflict"))


@router.post("/v1/edits/{edit_id}/reject")
async def reject_edit(edit_id: str, request: Request) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).review(p, edit_id, False, namespace(request))


@router.get("/v1/audit")
async def audit_log(request: Request, since: int = 0, limit: int = 100) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).audit(p, namespace(request), since=since, limit=limit)


@router.get("/v1/edits/{edit_id}")
async def get_edit(edit_id: str, request: Request) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).get(p, edit_id, namespace(request))


@router.get("/v1/edits/{edit_id}/history")
async def edit_history(edit_id: str, request: Request) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).history(p, edit_id, namespace(request))


@router.patch("/v1/edits/{edit_id}")
@router.put("/v1/edits/{edit_id}")
async def update_edit(edit_id: str, request: Request) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).update(p, edit_id, await json_body(request), namespace(request))


@router.delete("/v1/edits/{edit_id}")
async def delete_edit(edit_id: str, request: Request) -> dict[str, Any]:
    p = principal(request)
    return await _edits(request).delete(p, edit_id, namespace(request))
