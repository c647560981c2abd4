"""Model versions recorded in the PostgreSQL edit store, so replicas agree on which version is ``current``:
:class:`PostgresVersions`, the :class:`kem.versions.VersionRegistry` a :class:`kem.versions.VersionStore`
uses when ``KEM_STORE`` names PostgreSQL (:func:`kem.versions.versions_for`). The weights stay in the
models folder (``KEM_MODELS_DIR``, shared by the replicas).

Tables, in the store's schema:

- ``versions``: one row per published version: ``namespace`` ('' for the shared versions, else the
  tenant), ``name`` (``vN``), ``manifest`` (the version's ``manifest.json`` as JSONB), ``created_at``
  (the manifest's), ``recorded_at``.
- ``versions_current``: one row per namespace: the version ``current`` names (``name``; NULL: the base
  model), when and by whom (host, pid) it was set.

Every write that moves ``current`` (publish, rollback) sends ``NOTIFY kem_versions,
'<schema>:<namespace>:<version>'`` in its transaction (delivered at commit; ``base`` for the base model),
so ``kem serve`` replicas hot-swap (:mod:`kem.server.version_watch`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "kem_versions"

_DDL = [
    "CREATE TABLE IF NOT EXISTS versions (namespace TEXT NOT NULL, name TEXT NOT NULL, manifest JSONB NOT NULL, "
    "created_at TIMESTAMPTZ NOT NULL, recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (namespace, name))",
    "CREATE TABLE IF NOT EXISTS versions_current (namespace TEXT PRIMARY KEY, name TEXT, "
    "set_at TIMESTAMPTZ NOT NULL DEFAULT now(), set_by TEXT NOT NULL DEFAULT '')",
]


def payload(schema: str, namespace: str, version: str | None) -> str:
    """The ``kem_versions`` notification: ``<schema>:<namespace>:<version>`` ('' namespace: shared;
    ``base``: the base model)."""
    return f"{schema}:{namespace}:{version or 'base'}"


def parse_payload(text: str) -> tuple[str, str, str] | None:
    """``(schema, namespace, version)`` of a ``kem_versions`` payload (None if malformed). A namespace may
    hold ``:``; schema and version never do."""
    schema, sep, rest = text.partition(":")
    namespace, sep2, version = rest.rpartition(":")
    if not sep or not sep2 or not schema or not version:
        return None
    return schema, namespace, version


class PostgresVersions:
    """The ``versions`` and ``versions_current`` tables of the store ``url`` names (``?schema=`` as for the
    edit store). One connection, opened on first use and again after it drops; safe for many threads.

    Args:
        url: The PostgreSQL store URL (``postgresql://...[?schema=NAME]``).
    """

    def __init__(self, url: str) -> None:
        from kem.stores import split_schema
        from kem.stores.postgres import redact

        self.conninfo, self.schema = split_schema(url)
        self.where = f"the PostgreSQL store {redact(self.conninfo)} (schema {self.schema!r})"
        self._conn: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresVersions({self.where})"

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        import psycopg

        from kem.stores.postgres import _connect_error, ensure_tables

        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                try:
                    conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=3)  # a request may wait on it
                    ensure_tables(conn, self.schema, _DDL)
                except psycopg.Error as exc:
                    raise _connect_error(self.conninfo, exc) from exc
                self._conn = conn
            try:
                yield self._conn
            except psycopg.OperationalError as exc:
                self._conn.close()  # opened again by the next call
                self._conn = None
                raise _connect_error(self.conninfo, exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- reading -------------------------------------------------------------------------------------
    def current(self, namespace: str) -> tuple[bool, str | None]:
        """``(recorded, version)``: whether the database names a current version for ``namespace`` at all,
        and which (None: the base model)."""
        with self._connection() as conn:
            row = conn.execute("SELECT name FROM versions_current WHERE namespace = %s", (namespace,)).fetchone()
        return (False, None) if row is None else (True, row[0])

    def manifests(self, namespace: str) -> list[dict[str, Any]]:
        """The recorded manifests of ``namespace`` (any order)."""
        with self._connection() as conn:
            rows = conn.execute("SELECT manifest FROM versions WHERE namespace = %s", (namespace,)).fetchall()
        return [_as_dict(r[0]) for r in rows]

    def manifest(self, namespace: str, version: str) -> dict[str, Any] | None:
        with self._connection() as conn:
            row = conn.execute("SELECT manifest FROM versions WHERE namespace = %s AND name = %s",
                               (namespace, version)).fetchone()
        return None if row is None else _as_dict(row[0])

    def namespaces(self) -> list[str]:
        """Tenant namespaces with a recorded version (sorted; the shared '' left out)."""
        with self._connection() as conn:
            rows = conn.execute("SELECT DISTINCT namespace FROM versions WHERE namespace <> '' "
                                "ORDER BY namespace").fetchall()
        return [r[0] for r in rows]

    # ---- writing -------------------------------------------------------------------------------------
    def record(self, namespace: str, manifest: dict[str, Any], created_at: datetime, make_current: bool) -> None:
        """Record a published version (its folder is complete) and, with ``make_current``, point
        ``current`` at it and notify the replicas, in one transaction. Recording a version twice is a no-op."""
        name = str(manifest["version"])
        with self._connection() as conn, conn.transaction():
            conn.execute("INSERT INTO versions (namespace, name, manifest, created_at) VALUES (%s, %s, %s, %s) "
                         "ON CONFLICT (namespace, name) DO NOTHING",
                         (namespace, name, json.dumps(manifest), created_at))
            if make_current:
                self._set_current(conn, namespace, name)

    def set_current(self, namespace: str, version: str | None) -> None:
        """Point ``current`` of ``namespace`` at ``version`` (None: the base model) and notify the replicas."""
        with self._connection() as conn, conn.transaction():
            self._set_current(conn, namespace, version)

    def _set_current(self, conn: Any, namespace: str, version: str | None) -> None:
        by = f"{socket.gethostname()}:{os.getpid()}"
        conn.execute("INSERT INTO versions_current (namespace, name, set_at, set_by) VALUES (%s, %s, now(), %s) "
                     "ON CONFLICT (namespace) DO UPDATE SET name = EXCLUDED.name, set_at = now(), "
                     "set_by = EXCLUDED.set_by", (namespace, version, by))
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload(self.schema, namespace, version)))


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else json.loads(value)
