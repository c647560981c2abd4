"""API keys in the PostgreSQL edit store (``api_keys`` in the store's schema), so every replica
behind a load balancer knows the same keys: a :class:`~kem.keys.KeyBackend`.

Select with ``KEM_API_KEYS_FILE=store`` (``kem serve --keys store``) and a PostgreSQL ``KEM_STORE``;
manage with ``kem keys add|list|revoke`` or ``/admin/keys``. Only SHA-256 digests are stored. A replica
re-reads the table every :attr:`PostgresKeys.refresh` seconds, and at once (at most every 0.2 s) when
an unknown key arrives, so a key added on one replica works on the others at once and a revoked key
stops working everywhere within ``refresh`` seconds.
"""

from __future__ import annotations

from typing import Any

from kem.keys import KeyEntry, KeyLimits

_DDL = """CREATE TABLE IF NOT EXISTS api_keys (
    digest TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    admin BOOLEAN NOT NULL DEFAULT FALSE,
    rpm INTEGER, tpm INTEGER, parallel INTEGER,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


class PostgresKeys:
    """The ``api_keys`` table of the store ``url`` names (``?schema=`` as for the edit store).

    Args:
        url: The PostgreSQL store URL (``postgresql://...[?schema=NAME]``).
        refresh: Seconds between re-reads of the table.
    """

    def __init__(self, url: str, refresh: float = 2.0) -> None:
        from kem.stores import split_schema
        from kem.stores.postgres import redact

        self.conninfo, self.schema = split_schema(url)
        self.where = f"PostgreSQL {redact(self.conninfo)} (schema {self.schema})"
        self.refresh: float | None = refresh
        from kem.stores.postgres import ensure_tables

        with self._conn(set_path=False) as conn:
            ensure_tables(conn, self.schema, [_DDL, "ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS review BOOLEAN "
                                                   "NOT NULL DEFAULT FALSE"])

    def _conn(self, set_path: bool = True) -> Any:
        import psycopg
        from psycopg import sql

        from kem.stores.postgres import _connect_error

        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            raise _connect_error(self.conninfo, exc) from exc
        if set_path:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def load(self) -> dict[str, KeyEntry]:
        with self._conn() as conn:
            rows = conn.execute("SELECT digest, namespace, admin, rpm, tpm, parallel, review FROM api_keys "
                                "ORDER BY created_at, digest").fetchall()
        return {h: KeyEntry(h, ns, admin, KeyLimits(rpm=rpm, tpm=tpm, parallel=par), review=bool(review))
                for h, ns, admin, rpm, tpm, par, review in rows}

    def add(self, entry: KeyEntry) -> None:
        lim = entry.limits
        with self._conn() as conn:
            conn.execute("INSERT INTO api_keys (digest, namespace, admin, rpm, tpm, parallel, review) "
                         "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                         (entry.digest, entry.namespace, entry.admin, lim.rpm, lim.tpm, lim.parallel, entry.review))

    def remove(self, prefix: str) -> set[str]:
        with self._conn() as conn:
            rows = conn.execute("DELETE FROM api_keys WHERE left(digest, %s) = %s RETURNING digest",
                                (len(prefix), prefix)).fetchall()
        return {r[0] for r in rows}
