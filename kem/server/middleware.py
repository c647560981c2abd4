"""What wraps every route of ``kem serve``: the request-body limit and the request counter (pure ASGI
middleware), and the exception handlers that turn every error into an OpenAI-style error body."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kem.errors import KemError
from kem.server.prometheus import Metrics
from kem.server.protocol import error_body, kem_error_body

log = logging.getLogger("kem.server.app")


def _route_label(path: str) -> str:
    """Low-cardinality endpoint label for metrics (edit ids folded into ``{id}``)."""
    if path.startswith("/console"):
        return "/console"
    if path.startswith("/v1/edits/") and path not in ("/v1/edits/import", "/v1/edits/search"):
        return "/v1/edits/{id}/history" if path.endswith("/history") else "/v1/edits/{id}"
    if path.startswith("/admin/keys/"):
        return "/admin/keys/{id}"
    return path


class _BodyTooLarge(KemError):
    status_code = 413
    code = "request_too_large"


class LimitBody:
    """Pure ASGI middleware: a request body over ``max_bytes`` gets a 413 (by its ``content-length``, or
    counted as it arrives when chunked) before any route reads it whole."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps(error_body(f"the request body is larger than {self.max_bytes} bytes (KEM_MAX_BODY_BYTES)",
                                     413, "request_too_large", "body")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(f"the request body is larger than {self.max_bytes} bytes (KEM_MAX_BODY_BYTES)")
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send)


class CountRequests:
    """Pure ASGI middleware: counts responses by endpoint and status (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(_route_label(scope.get("path", "")), status[0])


def install_error_handlers(app: FastAPI) -> None:
    """Every kem error becomes an OpenAI-style error body with its status code; bad JSON or fields a 400
    naming the field; anything unexpected a logged 500 with a JSON body."""

    @app.exception_handler(KemError)
    async def _kem_error(request: Request, exc: KemError) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})  # 429: Retry-After
        if exc.status_code == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(kem_error_body(exc), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return JSONResponse(error_body("the request body nests too deeply", 400, "invalid_request_error", "body"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not bad input: logged with its traceback; the client gets a JSON body, not a reset connection
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", 500, "internal_error"),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0].get("loc", ())[1:]) if errs else None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:])} {e.get('msg')}" for e in errs)
        return JSONResponse(error_body(msg, 400, "invalid_request_error", loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)
