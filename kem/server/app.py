"""The FastAPI app of ``kem serve``: :func:`build_app` wires the routers (:mod:`kem.server.routes`), the
middleware and error handlers (:mod:`kem.server.middleware`), the services they call and the app's life
cycle; the operator console under ``/console`` (:mod:`kem.server.console`). No route is written here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from kem.editor import KnowledgeEditor
from kem.server.auth import KeyRing
from kem.server.middleware import CountRequests, LimitBody, install_error_handlers
from kem.server.prometheus import Metrics
from kem.server.routes import ROUTERS
from kem.server.serving import Reloader, Serving
from kem.settings import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings, editor: KnowledgeEditor, engine: Any, *, keys: KeyRing | None = None,
              served_name: str | None = None, reloader: Reloader | None = None,
              metrics: Metrics | None = None, follow_current: bool = False) -> FastAPI:
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
        follow_current: On a store that records versions (PostgreSQL), hot-swap to the recorded ``current``
            version when it moves (:mod:`kem.server.version_watch`; tenants' adapters follow it anyway).
    """
    keys = keys or KeyRing(None)
    serving = Serving(editor, engine, served_name=served_name, metrics=metrics,
                      default_max_tokens=settings.max_new_tokens, reloader=reloader, settings=settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        log.info("kem serving %s as %r (auth %s)", serving.engine.name, serving.served_name,
                 "on" if keys.enabled else "off")
        if editor.services.follows_versions:  # versions recorded in the store: watch them
            serving.watch_versions(follow_current)
        try:
            yield
        finally:
            await serving.aclose()

    docs = settings.api_docs  # off by default: the schema maps the API for anyone
    app = FastAPI(title="kem", version="0.1.0", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.serving = serving
    app.state.keys = keys
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=serving.metrics)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    if settings.console:  # the operator console (KEM_CONSOLE=false: off)
        from kem.server.console import build_console
        from kem.server.jobs import ConsoleJobs

        app.state.console_jobs = ConsoleJobs(settings)  # the dry runs started from the console
        app.include_router(build_console(serving, keys, settings, app.state.console_jobs))
    return app
