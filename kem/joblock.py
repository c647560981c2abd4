"""One consolidation job at a time, across processes and machines: :func:`job_lock`.

Two backends behind one context manager, chosen by the edit store (``settings.store``):

- SQLite (one machine): a file lock, ``<home>/models/.consolidate.lock`` (``filelock``: released by the
  OS when the holder dies), with the holder's details in ``.consolidate.holder`` (JSON) beside it.
- PostgreSQL (several replicas): a session-level advisory lock on a dedicated connection (released by the
  server when the holder's connection drops, so a killed job never leaves it stuck), with the holder's
  details in the ``job_lock`` table of the store's schema.

A second job does not wait: it raises :class:`~kem.errors.ConflictError` naming the holder (host, pid,
since when), which ``kem consolidate`` prints before exiting with code 2, having touched nothing. The
holder calls :meth:`HeldLock.check` before publishing: a PostgreSQL lock lost with its connection stops
the job there.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kem.errors import ConflictError, ConsolidationError
from kem.files import write_atomic

JOB = "consolidate"


def holder_info() -> dict[str, Any]:
    """Who takes the lock: this host, this process, now (UTC)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now(UTC).isoformat(timespec="seconds")}


@dataclass
class HeldLock:
    """A lock this process holds: who (host, pid, since) and :meth:`check`, which a job calls before it
    publishes anything: it raises :class:`~kem.errors.ConsolidationError` if the lock was lost (its
    PostgreSQL connection dropped, so another job may have started)."""

    host: str
    pid: int
    since: str
    _check: Callable[[], None] = field(default=lambda: None, repr=False)

    def check(self) -> None:
        self._check()

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "since": self.since}


def _wait_for_holder(read: Callable[[], dict[str, Any] | None], wait_s: float = 2.0) -> dict[str, Any] | None:
    """The holder's details, waiting up to ``wait_s`` for them: a holder writes them just after it takes the
    lock, so a job that lost the race by microseconds would otherwise find nothing to name."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = read()
        if holder or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


@contextmanager
def file_lock(folder: str | Path, job: str = JOB) -> Iterator[HeldLock]:
    """Hold ``<folder>/.<job>.lock`` for the block; yields the holder details written beside it."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f".{job}.lock"))
    info_path = folder / f".{job}.holder"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        def read() -> dict[str, Any] | None:
            try:
                return json.loads(info_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None

        holder = _wait_for_holder(read)
        raise ConflictError(f"another {job} job is running on {folder.parent} ({describe(holder)}; "
                            f"lock {lock.lock_file})") from None
    try:
        info = holder_info()
        write_atomic(info_path, json.dumps(info), new_mode=0o644)
        yield HeldLock(**info)  # the OS keeps a file lock as long as the process lives: nothing to check
    finally:
        info_path.unlink(missing_ok=True)
        lock.release()


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

            holder = _wait_for_holder(read)
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


@contextmanager
def job_lock(settings: Any, job: str = JOB) -> Iterator[HeldLock]:
    """The lock for ``job`` on the store ``settings`` names: PostgreSQL's advisory lock for a PostgreSQL
    store, a file lock in the models folder (``KEM_MODELS_DIR``, default ``<home>/models``) otherwise. Raises
    ConflictError (naming the holder) at once when another process holds it."""
    from kem.stores import is_postgres

    url = getattr(settings, "store", None)
    if url and is_postgres(url):
        with postgres_lock(url, job) as info:
            yield info
    else:
        with file_lock(settings.models_root(), job) as info:  # KEM_MODELS_DIR, default <home>/models
            yield info
