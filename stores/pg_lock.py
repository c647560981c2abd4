"""The consolidation job's lock on a PostgreSQL store: a session-level advisory lock, so one job runs at a
time across every machine sharing the store (offered as :meth:`kem.stores.services.PostgresServices.job_lock`;
the file lock and the holder details are :mod:`kem.joblock`'s)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kem.errors import ConflictError, ConsolidationError
from kem.joblock import JOB, HeldLock, describe, holder_info, wait_for_holder

_DDL = ("CREATE TABLE IF NOT EXISTS job_lock (job TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, "
        "since TEXT NOT NULL)")


@contextmanager
def postgres_lock(url: str, job: str = JOB) -> Iterator[HeldLock]:
    """Hold a session-level advisory lock named after the store's schema and ``job`` on a dedicated
    connection (TCP keepalives on) for the block; yields the holder details written to ``job_lock``."""
    import psycopg

    from kem.stores import split_schema
    from kem.stores.postgres import _connect_error, ensure_tables

    conninfo, schema = split_schema(url)
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=10, keepalives=1, keepalives_idle=30,
                               keepalives_interval=10, keepalives_count=3)
    except psycopg.Error as exc:
        raise _connect_error(conninfo, exc) from exc
    key = f"kem-job:{schema}:{job}"  # advisory keys are per database: the schema keeps stores apart
    try:
        ensure_tables(conn, schema, [_DDL])
        row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
        if not row or not row[0]:
            def read() -> dict[str, Any] | None:
                held = conn.execute("SELECT host, pid, since FROM job_lock WHERE job = %s", (job,)).fetchone()
                return dict(zip(("host", "pid", "since"), held, strict=True)) if held else None

            holder = wait_for_holder(read)
            raise ConflictError(f"another {job} job is running on the PostgreSQL store (schema {schema!r}; "
                                f"{describe(holder)})")
        info = holder_info()
        conn.execute("INSERT INTO job_lock (job, host, pid, since) VALUES (%s, %s, %s, %s) ON CONFLICT (job) "
                     "DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, since = EXCLUDED.since",
                     (job, info["host"], info["pid"], info["since"]))

        def check() -> None:
            try:
                row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                                   "AND pid = pg_backend_pid()").fetchone()
                held = bool(row and row[0])
            except psycopg.Error:
                held = False
            if not held:
                raise ConsolidationError(f"the {job} lock on the PostgreSQL store (schema {schema!r}) was lost "
                                         "(its connection dropped; another job may have started): nothing "
                                         "published, run the job again")

        try:
            yield HeldLock(**info, _check=check)
        finally:
            try:
                conn.execute("DELETE FROM job_lock WHERE job = %s AND pid = %s AND host = %s",
                             (job, info["pid"], info["host"]))
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
            except psycopg.Error:
                pass  # the connection is gone: so is the lock
    finally:
        conn.close()
