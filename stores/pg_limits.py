"""Rate and concurrency limits shared by every ``kem serve`` replica on one PostgreSQL store.

The per-process limiter (:class:`kem.server.limits.Limiter`) gives each replica its own buckets, so a
key behind N replicas gets N times its limits. Here the counts live in the store's schema, on the
database's clock (replicas' clocks never enter):

* ``limit_log``: one row per admitted request of a key with an rpm or tpm: when, and its tokens
  (reserved, then settled to what it used). rpm / tpm are **sliding windows**: at most ``rpm``
  requests and ``tpm`` tokens in any 60 seconds, whichever replica served them (rows older than a
  minute are deleted as the key's next request passes);
* ``limit_inflight``: one row per request in flight of a key with a parallel limit, with a lease: a
  replica that dies without releasing its requests holds their slots only until the lease ends
  (``lease`` seconds: the request timeout plus a margin);
* ``limit_keys``: one row per key, locked (``SELECT ... FOR UPDATE``) while a request of that key is
  checked and charged: requests of one key queue there across replicas; other keys do not wait.

:meth:`SharedBuckets.take` is one transaction per request. Only keys with a limit reach the database.
The per-process limiter is a token bucket (a burst of a minute's allowance, then ``rpm / 60`` a
second), so behind one replica a key may get up to twice its rpm in its first minute; the shared
window never gives more than ``rpm`` in any minute.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

WINDOW = 60.0  # seconds: rpm and tpm count what a key used in the last minute

_DDL = [
    "CREATE TABLE IF NOT EXISTS limit_keys (key_id TEXT PRIMARY KEY)",  # one row per key: its lock
    """CREATE TABLE IF NOT EXISTS limit_log (
        id TEXT PRIMARY KEY, key_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, tokens BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS limit_log_key ON limit_log (key_id, at)",
    """CREATE TABLE IF NOT EXISTS limit_inflight (
        id TEXT PRIMARY KEY, key_id TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS limit_inflight_key ON limit_inflight (key_id, expires)",
]
_NOW = "extract(epoch FROM clock_timestamp())::double precision"


@dataclass(frozen=True)
class Taken:
    """The outcome of :meth:`SharedBuckets.take`: admitted with its ``lease`` (the id of its log and
    in-flight rows) or, refused, ``wait`` seconds and ``reason`` (``parallel`` / ``rpm`` / ``tpm``);
    ``inflight`` is the key's count before this request."""

    admitted: bool
    lease: str | None = None
    wait: float = 0.0
    reason: str = ""
    inflight: int = 0


class SharedBuckets:
    """The shared limit tables of a PostgreSQL store (``connection``: its pooled-connection factory)."""

    def __init__(self, connection: Any, schema: str, lease: float = 330.0, window: float = WINDOW) -> None:
        from kem.stores.postgres import ensure_tables

        self._connection = connection
        self.lease = lease
        self.window = window  # seconds (a minute; tests shorten it)
        with connection() as conn:
            ensure_tables(conn, schema, _DDL)

    def take(self, key: str, rpm: int | None, tpm: int | None, parallel: int | None, tokens: int) -> Taken:
        """Admit one request of ``tokens`` for ``key`` under its limits, or say how long to wait."""
        with self._connection() as conn, conn.transaction():
            conn.execute("INSERT INTO limit_keys (key_id) VALUES (%s) ON CONFLICT DO NOTHING", (key,))
            now = conn.execute("SELECT " + _NOW + " FROM limit_keys WHERE key_id = %s FOR UPDATE",
                               (key,)).fetchone()[0]  # the key's lock: its requests queue here, across replicas
            inflight = 0
            if parallel is not None:
                conn.execute("DELETE FROM limit_inflight WHERE key_id = %s AND expires < %s", (key, now))
                inflight = int(conn.execute("SELECT count(*) FROM limit_inflight WHERE key_id = %s",
                                            (key,)).fetchone()[0])
                if inflight >= parallel:
                    return Taken(False, reason="parallel", inflight=inflight)
            if rpm is not None or tpm is not None:
                conn.execute("DELETE FROM limit_log WHERE key_id = %s AND at <= %s", (key, now - self.window))
                rows = conn.execute("SELECT at, tokens FROM limit_log WHERE key_id = %s ORDER BY at",
                                    (key,)).fetchall()
                waits = []
                if rpm is not None and len(rows) >= rpm:  # until the oldest requests leave the window
                    waits.append((rows[len(rows) - rpm][0] + self.window - now, "rpm"))
                used = sum(int(t) for _, t in rows)
                if tpm is not None and used + tokens > tpm:
                    for at, t in rows:
                        used -= int(t)
                        if used + tokens <= tpm:
                            waits.append((at + self.window - now, "tpm"))
                            break
                if waits:
                    wait, reason = max(waits)
                    return Taken(False, wait=max(0.01, wait), reason=reason, inflight=inflight)
            lease = uuid.uuid4().hex
            if rpm is not None or tpm is not None:
                conn.execute("INSERT INTO limit_log (id, key_id, at, tokens) VALUES (%s, %s, %s, %s)",
                             (lease, key, now, tokens))
            if parallel is not None:
                conn.execute("INSERT INTO limit_inflight (id, key_id, expires) VALUES (%s, %s, %s)",
                             (lease, key, now + self.lease))
            return Taken(True, lease=lease, inflight=inflight)

    def settle(self, lease: str, used: int) -> None:
        """Charge what a request used instead of what it reserved."""
        with self._connection() as conn:
            conn.execute("UPDATE limit_log SET tokens = %s WHERE id = %s", (max(0, used), lease))

    def release(self, lease: str) -> None:
        with self._connection() as conn:
            conn.execute("DELETE FROM limit_inflight WHERE id = %s", (lease,))

    def state(self, key: str, rpm: int | None, tpm: int | None) -> dict[str, Any]:
        """The key's requests in flight, and what is left of its rpm / tpm in the last minute."""
        with self._connection() as conn:
            count, used = conn.execute("SELECT count(*), coalesce(sum(tokens), 0) FROM limit_log WHERE key_id = %s "
                                       "AND at > " + _NOW + " - %s", (key, self.window)).fetchone()
            inflight = int(conn.execute("SELECT count(*) FROM limit_inflight WHERE key_id = %s AND expires >= "
                                        + _NOW, (key,)).fetchone()[0])
        return {"inflight": inflight, "requests": None if rpm is None else rpm - int(count),
                "tokens": None if tpm is None else tpm - int(used)}
