"""Replica sync: keeps a replica's edit memory (its local FAISS index) in step with a shared PostgreSQL store
between requests, woken by ``LISTEN kem_changes``, with a periodic catch-up in case a notification is lost.

While its listener is healthy, a replica knows the store's latest revision without asking the database
(:meth:`Syncer.known_revision`: the highest seq notified for its schema, or written through this
replica), so a read no longer costs a revision query; when the listener is down, reads fall back to
asking the store, as with SQLite.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol, cast

from kem.errors import KemError
from kem.protocols import EditStore

if TYPE_CHECKING:
    from kem.memory import EditMemory
    from kem.stores.pg_listen import Listener

log = logging.getLogger(__name__)


class AnnouncingStore(EditStore, Protocol):
    """A store whose services announce writes (``services.notifications``: :class:`kem.stores.postgres.PostgresStore`)."""

    @property
    def written_revision(self) -> int:
        """The last revision this store object committed (0: none yet), known without a query."""
        ...


DEBOUNCE_S = 0.02  # after a wake-up, wait this long so a burst of notifications costs one sync


class Syncer:
    """A background worker applying a PostgreSQL store's changes to an :class:`~kem.memory.EditMemory`.

    A notification with a seq above the index's revision wakes the worker, which waits
    :data:`DEBOUNCE_S` (notifications arriving meanwhile are coalesced) and then replays
    ``changes_since`` once; it also checks the store every ``interval`` seconds and after every
    reconnect of the listener (notifications sent while it was disconnected are lost).

    Args:
        memory: The edit memory; its store's services must announce writes (``notifications``: PostgreSQL).
        interval: Seconds between catch-ups that ask the store for its revision (> 0).
    """

    def __init__(self, memory: EditMemory, interval: float = 2.0) -> None:
        services = memory.store.services
        if not services.notifications:
            raise TypeError(f"Syncer needs a store that announces its writes (got {type(memory.store).__name__})")
        if interval <= 0:
            raise ValueError(f"sync interval must be > 0 seconds (got {interval})")
        self.memory = memory
        self.store = cast("AnnouncingStore", memory.store)
        self.interval = interval
        self._prefix = f"{services.schema}:"
        self._notified = 0  # highest seq notified for this schema
        self._verified_at = 0  # listener.connects when the last sync that asked the store started
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.syncs = 0  # background syncs that applied something
        self.errors = 0  # background syncs that failed (database away)
        self.listener: Listener = services.listener(self._on_notify, self._wake.set, name=f"kem-sync-{services.schema}")
        self._worker = threading.Thread(target=self._run, name=f"kem-sync-worker-{services.schema}", daemon=True)

    def start(self) -> Syncer:
        self.listener.start()
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop the listener and the worker (joins both; idempotent)."""
        self._stop.set()
        self._wake.set()
        self.listener.close()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(30)

    @property
    def healthy(self) -> bool:
        """Listening, and the store was checked since the listener last (re)connected."""
        return self.listener.healthy and self._verified_at == self.listener.connects

    def known_revision(self) -> int | None:
        """The store's revision as far as this replica knows without a query: the highest seq notified
        or written through this replica; ``None`` when that may be stale (listener not healthy): ask
        the store."""
        if not self.healthy:
            return None
        return max(self._notified, self.store.written_revision)

    def _on_notify(self, channel: str, payload: str) -> None:
        if not payload.startswith(self._prefix):
            return  # another schema (another kem deployment on the same database)
        try:
            seq = int(payload[len(self._prefix):])
        except ValueError:
            log.warning("ignoring a malformed %s notification %r", channel, payload)
            return
        if seq > self._notified:  # only this thread writes it
            self._notified = seq
        if seq > self.memory.index.revision:
            self._wake.set()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            woken = self._wake.wait(self.interval)
            if self._stop.is_set():
                break
            if woken:
                time.sleep(DEBOUNCE_S)  # coalesce a burst
            self._wake.clear()
            connects = self.listener.connects  # read before asking the store (see healthy)
            try:
                before = self.memory.index.revision
                self.memory.sync(ask_store=True)
            except KemError as exc:  # StoreUnavailable while the database restarts: the next round retries
                self.errors += 1
                (log.debug if failing else log.warning)("background sync failed: %s", exc)
                failing = True
                continue
            except Exception:
                self.errors += 1
                log.exception("background sync failed")
                continue
            if failing:
                log.info("background sync works again (index at revision %d)", self.memory.index.revision)
            failing = False
            if self.memory.index.revision != before:
                self.syncs += 1
            if self.listener.healthy:
                self._verified_at = connects

    def __repr__(self) -> str:
        return f"Syncer({self.store!r}, healthy={self.healthy}, notified={self._notified})"
