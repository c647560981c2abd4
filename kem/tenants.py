"""Which adapter a tenant's requests run with: the tenant's current consolidated version
(``<models>/tenants/<namespace>/current`` -> ``vN/adapter``, the models folder being ``KEM_MODELS_DIR``,
default ``<home>/models``), re-read when the pointer changes.

No torch here. A tenant's versions (written by ``kem consolidate --namespace``, see
:mod:`kem.versions`)::

    models/tenants/alice/
      v1/  manifest.json (parent: the shared version it applies to)  adapter/
           adapter_with_follower/ (when an edit-follower was configured)
      current             "v1"

:class:`TenantLoras` answers, per request, in one ``stat`` of the ``current`` pointer (its
mtime and size are the cache key): a newly published or rolled-back tenant version is picked up by
the next request, without a restart. The adapter is only ever looked up by the request's own
namespace, so one tenant's adapter never serves another.

With a PostgreSQL store the tenant's ``current`` is the one recorded in the database
(:class:`kem.versions.VersionRegistry`), re-read at most every ``refresh`` seconds and at once after
:meth:`TenantLoras.invalidate` (``kem serve`` calls it when ``NOTIFY kem_versions`` names the tenant).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kem.protocols import LoraRef
from kem.versions import TENANTS, VersionRegistry, registry_for

if TYPE_CHECKING:
    from kem.settings import Settings

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TenantVersion:
    """What a tenant's requests are served with.

    Attributes:
        namespace: The tenant.
        version: Its current version (``vN``).
        lora: The tenant's consolidated facts as a LoRA (out-of-scope requests, and in-scope ones
            composed as IKE prompts).
        with_follower: One LoRA carrying the tenant's facts and the edit-follower (in-scope requests
            with the follower on), when the version has one.
        absorbed: Version names whose edits the adapter holds (``consolidated_in`` values): the fast
            path skips them for this tenant only.
    """

    namespace: str
    version: str
    lora: LoraRef
    with_follower: LoraRef | None
    absorbed: frozenset[str]


class TenantLoras:
    """The current adapter of each tenant under ``<home>/models/tenants``, cached per namespace and
    re-read when the tenant's ``current`` pointer changes (mtime, size).

    A tenant's adapter is a delta over the shared version it was computed on (its manifest's
    ``parent``): it applies only while the shared weights served are that version
    (:meth:`kem.versions.VersionStore.adapter_on`), told here by the shared absorbed versions.

    Args:
        home: kem's data folder (``Settings.home``).
        models_dir: The models folder (default ``<home>/models``).
        registry: The versions recorded in a PostgreSQL store (None: the pointer files decide).
        refresh: With a registry: seconds a tenant's looked-up current is trusted before it is read again.
    """

    def __init__(self, home: str | os.PathLike[str], *, models_dir: str | os.PathLike[str] | None = None,
                 registry: VersionRegistry | None = None, refresh: float = 2.0) -> None:
        self.home = Path(home).expanduser()
        self.models = Path(models_dir).expanduser() if models_dir is not None else self.home / "models"
        self.root = self.models / TENANTS
        self.registry = registry
        self.refresh = refresh
        # namespace -> (pointer key, the version or None, the shared absorbed set it needs, when checked)
        self._cache: dict[str, tuple[Hashable | None, TenantVersion | None, frozenset[str], float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> TenantLoras:
        """The settings' models folder (``KEM_MODELS_DIR``) and, with a PostgreSQL store, its recorded versions."""
        return cls(settings.home, models_dir=settings.models_root(), registry=registry_for(settings))

    def close(self) -> None:
        if self.registry is not None:
            self.registry.close()

    def invalidate(self, namespace: str) -> None:
        """Read ``namespace``'s current version again at its next request (it was published or rolled back)."""
        with self._lock:
            self._cache.pop(namespace, None)

    def __repr__(self) -> str:
        return f"TenantLoras({str(self.root)!r})"

    def clear(self) -> None:
        """Forget every cached lookup (``/admin/reload``)."""
        with self._lock:
            self._cache.clear()

    def get(self, namespace: str | None, shared: frozenset[str] = frozenset()) -> TenantVersion | None:
        """The version ``namespace``'s requests run with, or None: no tenant version published, the
        tenant rolled back to the base model, or its adapter was computed on another shared version
        than the one served (``shared``: the served shared version and its ancestors)."""
        if not namespace or "/" in namespace or namespace.startswith("."):
            return None
        hit = self._cache.get(namespace)
        now = time.monotonic()
        fresh = self.registry is not None and hit is not None and now - hit[3] < self.refresh
        key = hit[0] if fresh and hit is not None else self._key(namespace, hit)  # invalidate() drops the hit
        if hit is None or hit[0] != key:
            tv, needs = self._load(namespace) if key is not None else (None, frozenset())
            hit = (key, tv, needs, now)
            with self._lock:
                self._cache[namespace] = hit
            if tv is not None:
                log.info("namespace %s: adapter %s (on shared weights %s)", namespace, tv.lora.name,
                         sorted(needs) or "base")
        elif not fresh and self.registry is not None:  # read again just now and unchanged: trusted anew
            hit = (*hit[:3], now)
            with self._lock:
                self._cache[namespace] = hit
        if hit[1] is not None and hit[2] != shared:
            return None  # computed on other shared weights: its edits stay on the fast path
        return hit[1]

    def _key(self, namespace: str, hit: Any) -> Hashable | None:
        """What identifies the tenant's current version now (None: nothing published): the registry's
        current, else the pointer file's mtime and size."""
        if self.registry is not None:
            from kem.errors import KemError

            try:
                recorded, name = self.registry.current(namespace)
            except KemError as exc:  # the database is away: keep what was served
                log.warning("tenant %s: cannot read its current version (%s); keeping the last one", namespace, exc)
                return hit[0] if hit is not None else None
            if recorded:
                return ("recorded", name) if name else None
        try:
            st = os.stat(self.root / namespace / "current")
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _load(self, namespace: str) -> tuple[TenantVersion | None, frozenset[str]]:
        from kem.errors import KemError
        from kem.versions import VersionStore

        try:
            store = VersionStore(self.home, namespace=namespace, models_dir=self.models, registry=self.registry)
            cur = store.current()
            if cur is None:
                return None, frozenset()
            served = store.resolve(cur)
            needs = store.shared().absorbed(served.parent)
        except KemError as exc:  # a bad name, a missing manifest: served without an adapter, said once
            log.warning("tenant %s: no adapter served (%s)", namespace, exc)
            return None, frozenset()
        adapter = served.lora
        if adapter is None or not (adapter / "adapter_config.json").is_file():
            log.warning("tenant %s: %s has no adapter/ folder; serving it without one", namespace, served.path)
            return None, frozenset()
        name = f"{namespace}/{served.version}"
        both = served.lora_with_follower
        with_follower = LoraRef(f"{name}+follower", str(both.resolve())) if both is not None else None
        return TenantVersion(namespace, served.version, LoraRef(name, str(adapter.resolve())), with_follower,
                             served.absorbed), needs
