"""What every route shares: the services on the app's state, the caller, parsing and the response shape."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError as PydanticValidationError

from kem.edit import validation_error
from kem.errors import ForbiddenError, ValidationError
from kem.server.auth import KeyRing, Principal
from kem.server.edits import parse_json
from kem.server.serving import Result, Serving


def serving(request: Request) -> Serving:
    """The app's :class:`~kem.server.serving.Serving` (set by :func:`kem.server.app.build_app`)."""
    return request.app.state.serving  # type: ignore[no-any-return]


def keys(request: Request) -> KeyRing:
    return request.app.state.keys  # type: ignore[no-any-return]


def principal(request: Request) -> Principal:
    """The caller, by its bearer token or ``x-api-key`` (auth off: the anonymous admin)."""
    return keys(request).authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))


def admin(request: Request) -> Principal:
    p = principal(request)
    if not p.admin:
        raise ForbiddenError("this endpoint needs an admin key")
    return p


def parse(model: Any, raw: bytes, what: str) -> Any:
    """``raw`` validated as the pydantic ``model``; a 400 naming the field otherwise."""
    try:
        return model.model_validate_json(raw)
    except PydanticValidationError as exc:
        raise validation_error(what, exc) from None


async def json_body(request: Request) -> Any:
    return parse_json(await request.body())


def namespace(request: Request) -> str | None:
    """The namespace a request names: ``?namespace=``, else the ``x-kem-namespace`` header."""
    return request.query_params.get("namespace") or request.headers.get("x-kem-namespace")


def no_edits(request: Request) -> bool:
    """``x-kem-no-edits: 1`` (or true / yes): bypass the fast path, the served weights alone."""
    value = (request.headers.get("x-kem-no-edits") or "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValidationError(f"x-kem-no-edits must be 1 or 0 (got {value[:20]!r})", field="x-kem-no-edits")


def respond(result: Result) -> Response:
    """A JSON body or an SSE stream, with ``x-kem-edits`` (and ``x-kem-namespace``) headers."""
    headers = {"x-kem-edits": result.header()}
    if result.namespace:
        headers["x-kem-namespace"] = result.namespace
    if result.stream is not None:
        headers["cache-control"] = "no-cache"
        return StreamingResponse(result.stream, media_type="text/event-stream", headers=headers)
    return JSONResponse(result.body, headers=headers)
