"""Hot swap across replicas: a ``kem serve`` on a store that records model versions (its services'
``follows_versions``: PostgreSQL, :mod:`kem.stores.pg_versions`) watches them.

A publish or rollback anywhere sends ``NOTIFY kem_versions, '<schema>:<namespace>:<version>'``.
:class:`VersionWatcher` listens (the store's ``version_listener``) and, for this store's schema:

- a shared version (namespace ''), when this replica serves ``current`` (``kem serve --model-version
  current``, not a pinned ``vN``): the same in-place reload as ``POST /admin/reload {"version":
  "current"}`` (:meth:`kem.server.serving.Serving.reload`: one at a time; notifications arriving during
  a reload coalesce into one more). A reload that fails keeps the engine serving, is logged, and is tried
  again after 1, 2, 4, 8 and 16 s (an NFS client may see the new folder a little late), then not until the
  next notification;
- a tenant's version: that tenant's adapter lookup is invalidated, so its next request reads the new
  ``current`` (:meth:`kem.tenants.TenantLoras.invalidate`).

After every (re)connect of the listener it catches up: tenants' lookups are dropped and, when following
``current``, the recorded current is compared with what is served and loaded if it differs (a
notification sent while the connection was down is lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kem.server.serving import Serving
    from kem.settings import Settings

log = logging.getLogger(__name__)

RETRY_S = 1.0  # first retry of a failed reload; doubled each time
RETRIES = 5


class VersionWatcher:
    """Watch the versions recorded in the store (see the module docstring).

    Args:
        serving: The server's :class:`~kem.server.serving.Serving`; its store's services must record versions.
        settings: kem settings.
        loop: The server's event loop (reloads run there).
        follow_current: Reload the shared weights when ``current`` moves (False: a pinned version or the
            base model is served; only tenants' adapters follow).
    """

    def __init__(self, serving: Serving, settings: Settings, loop: asyncio.AbstractEventLoop, *,
                 follow_current: bool) -> None:
        self.serving = serving
        self.settings = settings
        self.loop = loop
        self.follow_current = follow_current
        self.swaps = 0  # reloads done on a notification or a catch-up
        self.failures = 0
        self.last_swap_s: float | None = None  # seconds from the notification to serving the new version
        self._dirty = False
        self._since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._attempt = 0  # failed reloads in a row since the last notification
        self._retry: asyncio.TimerHandle | None = None
        self._listener: Any = None

    def start(self) -> VersionWatcher:
        self._listener = self.serving.editor.services.version_listener(self._on_change, self._on_reconnect,
                                                                       name="kem-versions").start()
        return self

    @property
    def healthy(self) -> bool:
        return self._listener is not None and self._listener.healthy

    def status(self) -> dict[str, Any]:
        """What ``/healthz`` shows under ``versions``."""
        return {"follow": "current" if self.follow_current else "tenants", "listening": self.healthy,
                "swaps": self.swaps, "failures": self.failures, "last_swap_s": self.last_swap_s}

    async def aclose(self) -> None:
        if self._listener is not None:
            await asyncio.to_thread(self._listener.close)
        if self._retry is not None:
            self._retry.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # ---- the listener's thread ----------------------------------------------------------------------
    def _on_change(self, namespace: str, version: str | None) -> None:
        if namespace:
            log.info("namespace %s: current version is now %s (announced by the store)", namespace, version)
            self.serving.editor.tenants.invalidate(namespace)
        elif self.follow_current:
            log.info("current model version is now %s (announced by the store): reloading", version)
            self._wake()

    def _on_reconnect(self) -> None:
        self.serving.editor.tenants.clear()
        if self.follow_current:
            self._wake()  # catch up: a publish while the connection was down sent a notification nobody heard

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._kick, time.perf_counter())
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    # ---- the event loop -----------------------------------------------------------------------------
    def _kick(self, at: float | None) -> None:
        """Reload soon: on a notification or reconnect (``at``: when it arrived), or a retry (``at`` None)."""
        if at is not None:  # news: a fresh series of attempts
            self._attempt = 0
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
        self._dirty = True
        self._since = self._since or at
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        from kem.server.protocol import ReloadRequest

        while self._dirty:
            self._dirty = False
            try:
                target = await asyncio.to_thread(self._recorded_absorbed)
                if target == self.serving.editor.absorbed_versions:
                    self._since, self._attempt = None, 0
                    continue  # already served (our own start, or a notification for what we serve)
                out = await self.serving.reload(ReloadRequest(version="current"))
            except Exception as exc:  # noqa: BLE001 - the old engine keeps serving; say why, once per attempt
                self.failures += 1
                self._attempt += 1
                again = ""
                if self._attempt <= RETRIES and not self._dirty:
                    delay = RETRY_S * 2 ** (self._attempt - 1)
                    self._retry = self.loop.call_later(delay, self._kick, None)
                    again = f" (trying again in {delay:.0f} s)"
                else:
                    self._since = None
                log.error("hot swap to the store's current model version failed; still serving %s: %s%s",
                          self.serving.engine.name, exc, again)
                continue
            self._attempt = 0
            self.swaps += 1
            if self._since is not None:
                self.last_swap_s = time.perf_counter() - self._since
            self._since = None
            log.info("hot swap: now serving %s (version %s, load %.2f s, %.2f s after the announcement)",
                     out["model"], out["version"], out["seconds"], self.last_swap_s or 0.0)

    def _recorded_absorbed(self) -> frozenset[str]:
        """The versions whose edits the store's current version holds (its chain)."""
        from kem.versions import versions_for

        with versions_for(self.settings) as versions:
            return versions.absorbed(versions.current())
