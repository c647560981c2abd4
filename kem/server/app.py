"""The FastAPI app of ``kem serve``: routes, auth, error mapping and lifespan over :mod:`kem.server.serving`.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/v1/edits`` (CRUD, paging, bulk
import, history), ``/healthz``, ``/metrics``, and for admins ``/admin/reload`` (hot swap) and
``/admin/keys``; the operator console under ``/console`` (:mod:`kem.server.console`). Every kem error becomes an OpenAI-style error body with its status code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kem.edit import parse_time, validation_error
from kem.editor import KnowledgeEditor
from kem.errors import ForbiddenError, KemError, ValidationError
from kem.server.auth import KeyRing, Principal
from kem.server.edits import parse_json
from kem.server.limits import KeyLimits
from kem.server.metrics import Metrics
from kem.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ReloadRequest,
    error_body,
    kem_error_body,
)
from kem.server.serving import Reloader, Result, Serving

log = logging.getLogger(__name__)


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


class _LimitBody:
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


class _CountRequests:
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


def build_app(settings: Any, editor: KnowledgeEditor, engine: Any, *, keys: KeyRing | None = None,
              served_name: str | None = None, reloader: Reloader | None = None,
              metrics: Metrics | None = None, follow_current: bool = False) -> Any:
    """Build the FastAPI app. Routes authenticate, parse, call :class:`Serving` and respond.

    Args:
        settings: :class:`kem.settings.Settings` (default namespace, generation length, versions' home).
        editor: The knowledge editor (closed when the app shuts down).
        engine: A local generator or an HTTP engine (see :mod:`kem.server.serving`).
        keys: API keys; ``None`` or an empty ring: auth off.
        served_name: The model name clients use (default: the engine's).
        reloader: ``(request, current engine) -> engine`` for ``POST /admin/reload``: a new engine, or the
            current one with new weights loaded in place (``None``: hot swap not supported).
        metrics: Shared metrics (a new one by default).
        follow_current: On a PostgreSQL store, hot-swap to the recorded ``current`` version when it moves
            (:mod:`kem.server.follow`; tenants' adapters follow on any PostgreSQL store).
    """
    keys = keys or KeyRing(None)
    serving = Serving(editor, engine, served_name=served_name, metrics=metrics,
                      default_max_tokens=settings.max_new_tokens, reloader=reloader, settings=settings)
    edits = serving.edits

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        log.info("kem serving %s as %r (auth %s)", serving.engine.name, serving.served_name,
                 "on" if keys.enabled else "off")
        from kem.stores import is_postgres

        if is_postgres(getattr(settings, "store", None)):  # versions recorded in the database: follow them
            import asyncio

            from kem.server.follow import VersionFollower

            app.state.follower = VersionFollower(serving, settings, asyncio.get_running_loop(),
                                                 follow_current=follow_current).start()
        try:
            yield
        finally:
            if app.state.follower is not None:
                await app.state.follower.aclose()
            await serving.aclose()

    docs = bool(getattr(settings, "api_docs", False))  # off by default: the schema maps the API for anyone
    app = FastAPI(title="kem", version="0.1.0", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.serving = serving
    app.state.follower = None  # kem.server.follow.VersionFollower, on a PostgreSQL store
    app.state.keys = keys
    app.add_middleware(_LimitBody, max_bytes=int(getattr(settings, "max_body_bytes", 32 * 1024 * 1024)))
    app.add_middleware(_CountRequests, metrics=serving.metrics)

    # ---- errors ---------------------------------------------------------------------------------------
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

    # ---- helpers --------------------------------------------------------------------------------------
    def principal(request: Request) -> Principal:
        return keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))

    def admin(request: Request) -> Principal:
        p = principal(request)
        if not p.admin:
            raise ForbiddenError("this endpoint needs an admin key")
        return p

    def parse(model: Any, raw: bytes, what: str) -> Any:
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
        headers = {"x-kem-edits": result.header()}
        if result.namespace:
            headers["x-kem-namespace"] = result.namespace
        if result.stream is not None:
            headers["cache-control"] = "no-cache"
            return StreamingResponse(result.stream, media_type="text/event-stream", headers=headers)
        return JSONResponse(result.body, headers=headers)

    # ---- OpenAI endpoints -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        p = principal(request)
        raw = await request.body()
        req = parse(ChatCompletionRequest, raw, "ChatCompletionRequest")
        ns = p.namespace_for(request.headers.get("x-kem-namespace"))
        return respond(await serving.chat(req, raw, ns, caller=p, disconnected=request.is_disconnected,
                                          as_of=parse_time(request.headers.get("x-kem-as-of"), "x-kem-as-of"),
                                          use_edits=not no_edits(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        p = principal(request)
        raw = await request.body()
        req = parse(CompletionRequest, raw, "CompletionRequest")
        ns = p.namespace_for(request.headers.get("x-kem-namespace"))
        return respond(await serving.completion(req, raw, ns, caller=p, disconnected=request.is_disconnected,
                                                as_of=parse_time(request.headers.get("x-kem-as-of"), "x-kem-as-of"),
                                                use_edits=not no_edits(request)))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        principal(request)
        return serving.models().model_dump()

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        # with auth on, only admins see what is served (model, absorbed versions, fast path)
        if keys.enabled:
            try:
                if not principal(request).admin:
                    return {"status": "ok"}
            except KemError:
                return {"status": "ok"}
        body = serving.health()
        follower = app.state.follower
        if follower is not None:
            body["versions"] = {"follow": "current" if follower.follow_current else "tenants",
                                "listening": follower.healthy, "swaps": follower.swaps,
                                "failures": follower.failures, "last_swap_s": follower.last_swap_s}
        return body

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        if keys.enabled:  # labels name namespaces: only admins (a scraper with an admin bearer token)
            admin(request)
        return PlainTextResponse(serving.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- the edits API (kem.server.edits) -------------------------------------------------------------
    @app.post("/v1/edits", status_code=201)
    async def create_edit(request: Request) -> Response:
        p = principal(request)
        body = await json_body(request)
        return JSONResponse(await edits.create(p, body, request.headers.get("x-kem-namespace"),
                                               request.query_params.get("on_conflict")), status_code=201)

    @app.post("/v1/edits/import", status_code=201)
    async def import_edits(request: Request) -> Response:
        p = principal(request)
        out = await edits.import_edits(p, await request.body(), request.headers.get("content-type", ""),
                                       request.headers.get("x-kem-namespace"),
                                       request.query_params.get("on_conflict") or "supersede")
        return JSONResponse(out.model_dump(), status_code=201)

    @app.get("/v1/edits")
    async def list_edits(request: Request, limit: int = 50, offset: int = 0, status: str | None = None,
                         as_of: str | None = None, q: str | None = None, subject: str | None = None) -> dict[str, Any]:
        p = principal(request)
        page = await edits.list(p, namespace(request), limit=limit, offset=offset, status=status, as_of=as_of,
                                q=q, subject=subject)
        return page.model_dump()

    @app.get("/v1/edits/search")
    async def search_edits(request: Request, q: str = "", k: int = 20) -> dict[str, Any]:
        p = principal(request)
        return await edits.search(p, q, namespace(request), k=k)

    @app.post("/v1/edits/{edit_id}/approve")
    async def approve_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        return await edits.review(p, edit_id, True, namespace(request), request.query_params.get("on_conflict"))

    @app.post("/v1/edits/{edit_id}/reject")
    async def reject_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        return await edits.review(p, edit_id, False, namespace(request))

    @app.get("/v1/audit")
    async def audit_log(request: Request, since: int = 0, limit: int = 100) -> dict[str, Any]:
        p = principal(request)
        return await edits.audit(p, namespace(request), since=since, limit=limit)

    @app.get("/v1/edits/{edit_id}")
    async def get_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        return await edits.get(p, edit_id, namespace(request))

    @app.get("/v1/edits/{edit_id}/history")
    async def edit_history(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        return await edits.history(p, edit_id, namespace(request))

    @app.patch("/v1/edits/{edit_id}")
    @app.put("/v1/edits/{edit_id}")
    async def update_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        return await edits.update(p, edit_id, await json_body(request), namespace(request))

    @app.delete("/v1/edits/{edit_id}")
    async def delete_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        return await edits.delete(p, edit_id, namespace(request))

    # ---- admin ----------------------------------------------------------------------------------------
    @app.post("/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        admin(request)
        return await serving.reload(parse(ReloadRequest, await request.body(), "ReloadRequest"))

    @app.get("/admin/keys")
    async def list_keys(request: Request) -> dict[str, Any]:
        admin(request)
        return {"object": "list", "data": keys.list()}

    @app.post("/admin/keys", status_code=201)
    async def create_key(request: Request) -> Response:
        admin(request)
        body = await json_body(request) or {}
        ns = body.get("namespace") if isinstance(body, dict) else None
        if not isinstance(ns, str):
            raise ValidationError('send {"namespace": "...", "admin": false, "review": false, "rpm": N, "tpm": N, '
                                  '"parallel": N}', field="namespace")
        flags = {}
        for flag in ("admin", "review"):
            flags[flag] = body.get(flag, False)
            if not isinstance(flags[flag], bool):
                raise ValidationError(f"{flag} must be true or false (got {flags[flag]!r})", field=flag)
        limits = KeyLimits(**{k: body[k] for k in ("rpm", "tpm", "parallel") if body.get(k) is not None})
        key = keys.create(ns, flags["admin"], limits=limits, review=flags["review"])
        return JSONResponse({"object": "api_key", "key": key, "namespace": ns,
                             **({"review": True} if flags["review"] else {}),
                             **{k: v for k, v in vars(limits).items() if v is not None}}, status_code=201)

    @app.delete("/admin/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        admin(request)
        return {"object": "api_key.deleted", "revoked": keys.revoke(key_id)}

    # ---- the operator console (kem.server.console; KEM_CONSOLE=false: off) ----------------------------
    if getattr(settings, "console", True):
        from kem.server.console import build_console
        from kem.server.jobs import ConsoleJobs

        app.state.console_jobs = ConsoleJobs(settings)  # the dry runs started from the console
        app.include_router(build_console(serving, keys, settings, app.state.console_jobs))
    return app
