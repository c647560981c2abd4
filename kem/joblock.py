"""One consolidation job at a time, across processes and machines: the lock and its holder's details.

Two backends behind one context manager, :func:`kem.stores.services.job_lock`, which asks the edit store's
services (``settings.store``) for theirs:

- SQLite (one machine): a file lock, ``<home>/models/.consolidate.lock`` (``filelock``: released by the
  OS when the holder dies), with the holder's details in ``.consolidate.holder`` (JSON) beside it.
- PostgreSQL (several replicas): a session-level advisory lock on a dedicated connection (released by the
  server when the holder's connection drops, so a killed job never leaves it stuck), with the holder's
  details in the ``job_lock`` table of the store's schema (:mod:`kem.stores.pg_lock`).

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

from kem.errors import ConflictError
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


def wait_for_holder(read: Callable[[], dict[str, Any] | None], wait_s: float = 2.0) -> dict[str, Any] | None:
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

        holder = wait_for_holder(read)
        raise ConflictError(f"another {job} job is running on {folder.parent} ({describe(holder)}; "
                            f"lock {lock.lock_file})") from None
    try:
        info = holder_info()
        write_atomic(info_path, json.dumps(info), new_mode=0o644)
        yield HeldLock(**info)  # the OS keeps a file lock as long as the process lives: nothing to check
    finally:
        info_path.unlink(missing_ok=True)
        lock.release()
