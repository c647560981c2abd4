"""A reusable PostgreSQL ``LISTEN`` thread: one dedicated connection that hands each notification of some
channels to a callback and reconnects by itself when the connection drops (a database restart).

Used by the edit memory (``kem_changes``: a replica applies another replica's edits without waiting for a
request) and by the versions in the database (``kem_versions``: hot swap on publish).

Notifications sent while the connection was down are lost (PostgreSQL queues them per listening
session only), so ``on_reconnect`` runs after every (re)connect, once ``LISTEN`` is in place: callers
catch up there on what they may have missed (e.g. ``changes_since`` their last revision).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.25  # how long one wait for notifications lasts: the bound on close()'s latency
PING_S = 5.0  # without notifications, check the connection this often (a silent network cut)
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 1.0
CONNECT_TIMEOUT_S = 3  # libpq's connect_timeout (seconds; its minimum is 2)


class Listener:
    """A daemon thread that ``LISTEN``\\ s on ``channels`` over one autocommit psycopg 3 connection.

    Callbacks run on the listener's thread, one at a time: keep them short (set a flag, wake a worker).
    An exception raised by a callback is logged and the listener goes on.

    Args:
        conninfo: A libpq connection string or URL (without kem's ``?schema=`` parameter:
            :func:`kem.stores.split_schema` takes it out).
        channels: The channels to ``LISTEN`` on (quoted as identifiers: any name works).
        on_notify: Called as ``on_notify(channel, payload)`` for each notification.
        on_reconnect: Called after every successful (re)connect, the first included, once ``LISTEN``
            is in place, so that nothing sent after it returns is missed.
        name: The thread's name, and the connection's ``application_name`` (shown in
            ``pg_stat_activity``).

    Usage::

        listener = Listener(conninfo, ["kem_changes"], on_notify, on_catch_up).start()
        ...
        listener.close()  # within ~0.25 s; joins the thread and closes the connection
    """

    def __init__(self, conninfo: str, channels: Sequence[str], on_notify: Callable[[str, str], None],
                 on_reconnect: Callable[[], None] | None = None, *, name: str = "kem-listen") -> None:
        if not channels:
            raise ValueError("Listener.channels must name at least one channel")
        self.conninfo = conninfo
        self.channels = list(channels)
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.name = name
        self.connects = 0  # successful connects so far (1 after the first; more after reconnects)
        self._stop = threading.Event()
        self._healthy = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    @property
    def healthy(self) -> bool:
        """Connected and listening: every notification sent from now on will be delivered."""
        return self._healthy.is_set()

    def wait_healthy(self, timeout: float | None = None) -> bool:
        """Block until :attr:`healthy` (or ``timeout`` seconds); returns :attr:`healthy`."""
        return self._healthy.wait(timeout)

    def start(self) -> Listener:
        """Start the thread (it connects in the background; see :attr:`healthy`). Returns ``self``."""
        if self._thread is not None:
            raise RuntimeError(f"listener {self.name!r} was started already")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop listening, close the connection and join the thread (idempotent)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("listener %s did not stop within %.0f s", self.name, timeout)
        self._healthy.clear()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        import psycopg

        backoff = BACKOFF_START_S
        failures = 0
        while not self._stop.is_set():
            try:
                self._connect()
                backoff, failures = BACKOFF_START_S, 0
                self._listen()
            except psycopg.Error as exc:
                failures += 1
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                # the first failure in a row is worth a warning; the retries after it are noise
                (log.warning if failures == 1 else log.debug)(
                    "listener %s: connection lost or refused (%s); reconnecting in %.1f s", self.name, first, backoff)
            except Exception:  # a bug, not the network: keep the listener alive anyway
                failures += 1
                log.exception("listener %s failed; reconnecting in %.1f s", self.name, backoff)
            finally:
                self._healthy.clear()
                self._disconnect()
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _connect(self) -> None:
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name=self.name, keepalives=1, keepalives_idle=10,
                               keepalives_interval=5, keepalives_count=3)
        self._conn = conn
        for ch in self.channels:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(ch)))
        self.connects += 1
        self._healthy.set()
        if self.connects > 1:
            log.info("listener %s: reconnected", self.name)
        if self.on_reconnect is not None:
            try:
                self.on_reconnect()
            except Exception:
                log.exception("listener %s: on_reconnect failed", self.name)

    def _listen(self) -> None:
        conn = self._conn
        last = time.monotonic()
        while not self._stop.is_set():
            for n in conn.notifies(timeout=POLL_S):
                last = time.monotonic()
                try:
                    self.on_notify(n.channel, n.payload)
                except Exception:
                    log.exception("listener %s: on_notify(%r, %r) failed", self.name, n.channel, n.payload)
                if self._stop.is_set():
                    return
            if time.monotonic() - last >= PING_S:  # quiet for a while: is the connection still there?
                conn.execute("SELECT 1")
                last = time.monotonic()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken
                pass

    def __repr__(self) -> str:
        return f"Listener({self.name!r}, channels={self.channels}, healthy={self.healthy})"
