"""The HTTP routes of ``kem serve``, one router per area; :func:`kem.server.app.build_app` only wires them.

- :mod:`~kem.server.routes.openai_routes`: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``
- :mod:`~kem.server.routes.edit_routes`: ``/v1/edits`` (CRUD, paging, search, bulk import, history, review)
  and ``/v1/audit``
- :mod:`~kem.server.routes.admin_routes`: ``/admin/reload`` (hot swap) and ``/admin/keys``
- :mod:`~kem.server.routes.health_routes`: ``/healthz`` and ``/metrics``

A route authenticates, parses and calls a service (:class:`~kem.server.serving.Serving`,
:class:`~kem.server.edits.Edits`, the :class:`~kem.server.auth.KeyRing`), which it finds on the app's state
(:mod:`~kem.server.routes.deps`); nothing else. Each router can be mounted and tested alone.
"""

from __future__ import annotations

from kem.server.routes.admin_routes import router as admin_router
from kem.server.routes.edit_routes import router as edit_router
from kem.server.routes.health_routes import router as health_router
from kem.server.routes.openai_routes import router as openai_router

ROUTERS = (openai_router, edit_router, admin_router, health_router)

__all__ = ["ROUTERS"]
