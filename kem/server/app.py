"""The FastAPI app of ``kem serve``: routes, auth, error mapping and lifespan over :mod:`kem.server.serving`.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/v1/edits`` (CRUD, paging, bulk
import, history), ``/healthz``, ``/metrics``, and for admins ``/admin/reload`` (hot swap) and
``/admin/keys``. Every kem error becomes an OpenAI-style error body with its status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kem.edit import Edit, EditStatus, validation_error
from kem.editor import KnowledgeEditor
from kem.errors import ForbiddenError, KemError, ValidationError
from kem.models import resolve_model
from kem.server.auth import KeyRing, Principal
from kem.server.metrics import Metrics
from kem.server.protocol import (
    BulkResult,
    ChatCompletionRequest,
    CompletionRequest,
    EditPage,
    ReloadRequest,
    error_body,
    kem_error_body,
)
from kem.server.serving import Result, Serving
from kem.server.versions import is_published
from kem.server.versions import resolve as resolve_version

log = logging.getLogger(__name__)

MAX_PAGE = 1000
MAX_BULK = 50_000
Reloader = Callable[[ReloadRequest, Any], Any]  # (request, the engine serving now) -> the engine to serve


def _route_label(path: str) -> str:
    """Low-cardinality endpoint label for metrics (edit ids folded into ``{id}``)."""
    if path.startswith("/v1/edits/") and path not in ("/v1/edits/import",):
        return "/v1/edits/{id}/history" if path.endswith("/history") else "/v1/edits/{id}"
    if path.startswith("/admin/keys/"):
        return "/admin/keys/{id}"
    return path


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


async def _close_later(engine: Any, grace: float = 2.0) -> None:
    """Close a swapped-out engine after a grace period (requests that took it before the swap finish
    first: its queue drains before it stops)."""
    await asyncio.sleep(grace)
    try:
        await asyncio.to_thread(engine.close)
    except Exception as exc:  # best effort; the new engine is serving already
        log.warning("closing the old engine failed: %s", exc)


def build_app(settings: Any, editor: KnowledgeEditor, engine: Any, *, keys: KeyRing | None = None,
              served_name: str | None = None, reloader: Reloader | None = None,
              metrics: Metrics | None = None) -> Any:
    """Build the FastAPI app.

    Args:
        settings: :class:`kem.settings.Settings` (default namespace, generation length).
        editor: The knowledge editor (closed when the app shuts down).
        engine: A local generator or an HTTP engine (see :mod:`kem.server.serving`).
        keys: API keys; ``None`` or an empty ring: auth off.
        served_name: The model name clients use (default: the engine's).
        reloader: ``(request, current engine) -> engine`` for ``POST /admin/reload``: a new engine, or the
            current one with new weights loaded in place (``None``: hot swap not supported).
        metrics: Shared metrics (a new one by default).
    """
    keys = keys or KeyRing(None)
    serving = Serving(editor, engine, served_name=served_name, metrics=metrics,
                      default_max_tokens=settings.max_new_tokens)
    reload_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        log.info("kem serving %s as %r (auth %s)", serving.engine.name, serving.served_name,
                 "on" if keys.enabled else "off")
        yield
        close = getattr(serving.engine, "aclose", None)
        if close is not None:
            await close()
        await asyncio.to_thread(editor.close)

    app = FastAPI(title="kem", version="0.1.0", lifespan=lifespan)
    app.state.serving = serving
    app.state.keys = keys
    app.add_middleware(_CountRequests, metrics=serving.metrics)

    # ---- errors ---------------------------------------------------------------------------------------
    @app.exception_handler(KemError)
    async def _kem_error(request: Request, exc: KemError) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(kem_error_body(exc), status_code=exc.status_code, headers=headers)

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

    def parse(model: type, raw: bytes, what: str) -> Any:
        try:
            return model.model_validate_json(raw)
        except PydanticValidationError as exc:
            raise validation_error(what, exc) from None

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise ValidationError(f"the request body is not valid JSON: {exc}", field="body") from None

    def respond(result: Result) -> Response:
        headers = {"x-kem-edits": result.header()}
        if result.namespace:
            headers["x-kem-namespace"] = result.namespace
        if result.stream is not None:
            headers["cache-control"] = "no-cache"
            return StreamingResponse(result.stream, media_type="text/event-stream", headers=headers)
        return JSONResponse(result.body, headers=headers)

    def edit_json(e: Edit) -> dict[str, Any]:
        return {"object": "edit", **e.model_dump(mode="json")}

    # ---- OpenAI endpoints -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        p = principal(request)
        raw = await request.body()
        req = parse(ChatCompletionRequest, raw, "ChatCompletionRequest")
        ns = p.namespace_for(request.headers.get("x-kem-namespace"))
        return respond(await serving.chat(req, raw, ns))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        p = principal(request)
        raw = await request.body()
        req = parse(CompletionRequest, raw, "CompletionRequest")
        ns = p.namespace_for(request.headers.get("x-kem-namespace"))
        return respond(await serving.completion(req, raw, ns))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        principal(request)
        return serving.models().model_dump()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        follower = editor.follower_of(serving.engine)
        return {"status": "ok", "model": serving.engine.name, "served_name": serving.served_name,
                "absorbed_versions": sorted(editor.absorbed_versions),
                "fast_path": "adapter" if follower else "ike", "follower": follower}

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        if keys.enabled:  # labels name namespaces: only admins (a scraper with an admin bearer token)
            admin(request)
        return PlainTextResponse(serving.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- the edits API --------------------------------------------------------------------------------
    def run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.to_thread(fn, *args)

    @app.post("/v1/edits", status_code=201)
    async def create_edit(request: Request) -> Response:
        p = principal(request)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ValidationError("the body must be one Edit object (subject, prompt, target_new, ...)", field="body")
        body["namespace"] = p.namespace_for(body.get("namespace") or request.headers.get("x-kem-namespace"))
        edit = await run(editor.add, Edit.parse(body))
        return JSONResponse(edit_json(edit), status_code=201)

    @app.post("/v1/edits/import", status_code=201)
    async def import_edits(request: Request) -> Response:
        p = principal(request)
        ctype = request.headers.get("content-type", "")
        if "ndjson" in ctype or "jsonl" in ctype:
            raw = (await request.body()).decode()
            try:
                rows: Any = [json.loads(line) for line in raw.splitlines() if line.strip()]
            except ValueError as exc:
                raise ValidationError(f"the body is not valid JSON lines: {exc}", field="body") from None
        else:
            body = await json_body(request)
            rows = body.get("edits") if isinstance(body, dict) else body
        if not isinstance(rows, list) or not rows:
            raise ValidationError('send {"edits": [Edit, ...]} or JSON lines (one Edit per line)', field="edits")
        if len(rows) > MAX_BULK:
            raise ValidationError(f"at most {MAX_BULK} edits per import (got {len(rows)})", field="edits")
        edits = []
        header_ns = request.headers.get("x-kem-namespace")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValidationError(f"edits[{i}] must be an object", field=f"edits[{i}]")
            try:
                row = {**row, "namespace": p.namespace_for(row.get("namespace") or header_ns)}
                edits.append(Edit.parse(row))
            except ValidationError as exc:
                raise ValidationError(f"edits[{i}]: {exc}", field=f"edits[{i}].{exc.field}") from None
        stored = await run(editor.add_many, edits)
        return JSONResponse(BulkResult(created=len(stored), ids=[e.id for e in stored]).model_dump(), status_code=201)

    @app.get("/v1/edits")
    async def list_edits(request: Request, limit: int = 50, offset: int = 0, status: str | None = None,
                         namespace: str | None = None) -> dict[str, Any]:
        p = principal(request)
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationError(f"limit must be between 1 and {MAX_PAGE} (got {limit})", field="limit")
        if offset < 0:
            raise ValidationError(f"offset must be >= 0 (got {offset})", field="offset")
        try:
            st = EditStatus(status) if status else None
        except ValueError:
            raise ValidationError(f"status must be one of {[s.value for s in EditStatus]} (got {status!r})",
                                  field="status") from None
        ns = p.list_scope(namespace or request.headers.get("x-kem-namespace"))
        edits = await run(editor.list, ns, st, limit, offset)
        total = await run(editor.store.count, ns, st)
        nxt = offset + len(edits) if offset + len(edits) < total else None
        return EditPage(data=[edit_json(e) for e in edits], total=total, limit=limit, offset=offset,
                        next_offset=nxt).model_dump()

    def scope_of(p: Principal, request: Request) -> str | None:
        requested = request.query_params.get("namespace") or request.headers.get("x-kem-namespace")
        return p.list_scope(requested)

    @app.get("/v1/edits/{edit_id}")
    async def get_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        return edit_json(await run(editor.get, edit_id, scope_of(p, request)))

    @app.get("/v1/edits/{edit_id}/history")
    async def edit_history(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        changes = await run(editor.history, edit_id, scope_of(p, request))
        return {"object": "list", "data": [c.__dict__ for c in changes]}

    @app.patch("/v1/edits/{edit_id}")
    @app.put("/v1/edits/{edit_id}")
    async def update_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        changes = await json_body(request)
        if not isinstance(changes, dict) or not changes:
            raise ValidationError("the body must be an object of Edit fields to change", field="body")
        if "namespace" in changes:
            changes["namespace"] = p.namespace_for(changes["namespace"])
        if "id" in changes and changes["id"] != edit_id:
            raise ValidationError("id cannot be changed", field="id")
        edit = await run(editor.update, edit_id, changes, scope_of(p, request))
        return edit_json(edit)

    @app.delete("/v1/edits/{edit_id}")
    async def delete_edit(edit_id: str, request: Request) -> dict[str, Any]:
        p = principal(request)
        edit = await run(editor.remove, edit_id, scope_of(p, request))
        return {"object": "edit.deleted", "id": edit.id, "deleted": True}

    # ---- admin ----------------------------------------------------------------------------------------
    @app.post("/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        admin(request)
        req = parse(ReloadRequest, await request.body(), "ReloadRequest")
        async with reload_lock:
            absorbed = editor.absorbed_versions
            upstream_mode = hasattr(serving.engine, "forward")
            if req.version and (is_published(settings.home, req.version) or (req.path is None and not upstream_mode)):
                # a version consolidation published: its folder, and the edits of it and its ancestors
                # (in-process engines with no path: the version must be published, else 404)
                pub = await asyncio.to_thread(resolve_version, settings.home, req.version)
                absorbed = pub.absorbed
                update: dict[str, Any] = {"version": pub.version}
                if req.path is None and not upstream_mode:
                    update["path"] = str(pub.path) if pub.path else str(
                        await asyncio.to_thread(resolve_model, settings.model, settings.cache_dir))
                req = req.model_copy(update=update)
            elif req.version:
                absorbed = absorbed | {req.version}
            if req.absorbed_versions is not None:
                absorbed = frozenset(req.absorbed_versions)
            seconds = 0.0
            if req.path is None and req.upstream is None:  # only the absorbed versions change
                editor.absorbed_versions = absorbed
            else:
                if reloader is None:
                    raise ValidationError("this server cannot reload its engine", field="path")
                t0 = time.perf_counter()
                current = getattr(serving.engine, "sync", serving.engine)
                new_engine = await asyncio.to_thread(reloader, req, current)
                seconds = time.perf_counter() - t0
                old = serving.swap(new_engine, absorbed)
                if old is not new_engine and callable(getattr(old, "close", None)):
                    app.state.closing = asyncio.create_task(_close_later(old))  # e.g. vLLM: its process, KV cache
        return {"status": "ok", "model": serving.engine.name, "version": req.version,
                "absorbed_versions": sorted(absorbed), "seconds": round(seconds, 3)}

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
            raise ValidationError('send {"namespace": "...", "admin": false}', field="namespace")
        key = keys.create(ns, bool(body.get("admin", False)))
        return JSONResponse({"object": "api_key", "key": key, "namespace": ns}, status_code=201)

    @app.delete("/admin/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        admin(request)
        return {"object": "api_key.deleted", "revoked": keys.revoke(key_id)}

    return app
