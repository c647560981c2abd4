"""Which adapter a tenant's requests run with: the tenant's current consolidated version
(``<home>/models/tenants/<namespace>/current`` -> ``vN/adapter``), re-read when the pointer changes.

No torch here. A tenant's versions (written by ``kem consolidate --namespace``, see
:mod:`kem.versions`)::

    models/tenants/alice/
      v1/  manifest.json (parent: the shared version it applies to)  adapter/
           adapter_with_follower/ (when an edit-follower was configured)
      current             "v1"

:class:`TenantAdapters` answers, per request, in one ``stat`` of the ``current`` pointer (its
mtime and size are the cache key): a newly published or rolled-back tenant version is picked up by
the next request, without a restart. The adapter is only ever looked up by the request's own
namespace, so one tenant's adapter never serves another.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from kem.protocols import AdapterRef
from kem.versions import TENANTS

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TenantVersion:
    """What a tenant's requests are served with.

    Attributes:
        namespace: The tenant.
        version: Its current version (``vN``).
        adapter: The tenant's consolidated facts as a LoRA (out-of-scope requests, and in-scope ones
            composed as IKE prompts).
        with_follower: One LoRA carrying the tenant's facts and the edit-follower (in-scope requests
            with the follower on), when the version has one.
        absorbed: Version names whose edits the adapter holds (``consolidated_in`` values): the fast
            path skips them for this tenant only.
    """

    namespace: str
    version: str
    adapter: AdapterRef
    with_follower: AdapterRef | None
    absorbed: frozenset[str]


class TenantAdapters:
    """The current adapter of each tenant under ``<home>/models/tenants``, cached per namespace and
    re-read when the tenant's ``current`` pointer changes (mtime, size).

    A tenant's adapter is a delta over the shared version it was computed on (its manifest's
    ``parent``): it applies only while the shared weights served are that version
    (:meth:`kem.versions.VersionStore.adapter_on`), told here by the shared absorbed versions.

    Args:
        home: kem's data folder (``Settings.home``).
    """

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home).expanduser()
        self.root = self.home / "models" / TENANTS
        # namespace -> (pointer key, the version or None, the shared absorbed set it needs)
        self._cache: dict[str, tuple[tuple[int, int] | None, TenantVersion | None, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TenantAdapters({str(self.root)!r})"

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
        pointer = self.root / namespace / "current"
        try:
            st = os.stat(pointer)
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        hit = self._cache.get(namespace)
        if hit is None or hit[0] != key:
            tv, needs = self._load(namespace) if key is not None else (None, frozenset())
            hit = (key, tv, needs)
            with self._lock:
                self._cache[namespace] = hit
            if tv is not None:
                log.info("namespace %s: adapter %s (on shared weights %s)", namespace, tv.adapter.name,
                         sorted(needs) or "base")
        if hit[1] is not None and hit[2] != shared:
            return None  # computed on other shared weights: its edits stay on the fast path
        return hit[1]

    def _load(self, namespace: str) -> tuple[TenantVersion | None, frozenset[str]]:
        from kem.errors import KemError
        from kem.versions import VersionStore

        try:
            store = VersionStore(self.home, namespace=namespace)
            cur = store.current()
            if cur is None:
                return None, frozenset()
            served = store.resolve(cur)
            needs = store.shared().absorbed(served.parent)
        except KemError as exc:  # a bad name, a missing manifest: served without an adapter, said once
            log.warning("tenant %s: no adapter served (%s)", namespace, exc)
            return None, frozenset()
        adapter = served.adapter
        if adapter is None or not (adapter / "adapter_config.json").is_file():
            log.warning("tenant %s: %s has no adapter/ folder; serving it without one", namespace, served.path)
            return None, frozenset()
        name = f"{namespace}/{served.version}"
        both = served.adapter_with_follower
        with_follower = AdapterRef(f"{name}+follower", str(both.resolve())) if both is not None else None
        return TenantVersion(namespace, served.version, AdapterRef(name, str(adapter.resolve())), with_follower,
                             served.absorbed), needs
