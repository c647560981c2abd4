"""``kem.stores.pg_listen.Listener`` on the session's real PostgreSQL: notifications of its channels reach the
callback (others do not), a killed connection is reconnected with ``on_reconnect`` called again, and
``close()`` stops the thread promptly."""

from __future__ import annotations

import queue
import threading
import time

import psycopg
import pytest

from kem.stores import split_schema
from kem.stores.pg_listen import Listener


def _notify(conninfo: str, channel: str, payload: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def test_listener_delivers_reconnects_and_closes(pg_url):
    conninfo, _ = split_schema(pg_url)
    got: queue.Queue[tuple[str, str]] = queue.Queue()
    reconnects: list[float] = []
    name = f"kem-listen-test-{time.monotonic_ns()}"
    listener = Listener(conninfo, ["kem_test_a", "Kem Test B"], lambda c, p: got.put((c, p)),
                        lambda: reconnects.append(time.monotonic()), name=name)
    assert not listener.healthy
    with listener:
        assert listener.wait_healthy(10) and len(reconnects) == 1
        _notify(conninfo, "kem_other", "ignored")
        _notify(conninfo, "kem_test_a", "s:1")
        _notify(conninfo, "Kem Test B", "s:2")  # any name: channels are quoted identifiers
        assert [got.get(timeout=5), got.get(timeout=5)] == [("kem_test_a", "s:1"), ("Kem Test B", "s:2")]
        assert got.empty()

        # the connection is killed (as a database restart or a network cut would): back by itself
        with psycopg.connect(conninfo, autocommit=True) as conn:
            killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = %s", (name,)).fetchall()
        assert killed == [(True,)]
        deadline = time.monotonic() + 10
        while len(reconnects) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(reconnects) == 2 and listener.healthy and listener.connects == 2
        _notify(conninfo, "kem_test_a", "s:3")
        assert got.get(timeout=5) == ("kem_test_a", "s:3")
        thread = listener._thread
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2 and thread is not None and not thread.is_alive() and not listener.healthy
    with psycopg.connect(conninfo, autocommit=True) as conn:  # its connection is gone too
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                            (name,)).fetchone() == (0,)


def test_listener_waits_for_an_unreachable_server_and_survives_callback_errors(postgres_server):
    """A refused connection is retried (unhealthy meanwhile) and close() still returns at once; a callback
    that raises does not stop the listener."""
    from tests.postgres_server import free_port

    down = Listener(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", ["x"], lambda c, p: None)
    with down:
        time.sleep(0.5)
        assert not down.healthy and down.connects == 0
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2

    conninfo = postgres_server.url
    seen = threading.Event()
    calls: list[str] = []

    def flaky(channel: str, payload: str) -> None:
        calls.append(payload)
        if payload == "boom":
            raise RuntimeError("a bug in the callback")
        seen.set()

    with Listener(conninfo, ["kem_test_c"], flaky) as ok:
        assert ok.wait_healthy(10)
        _notify(conninfo, "kem_test_c", "boom")
        _notify(conninfo, "kem_test_c", "fine")
        assert seen.wait(5) and calls == ["boom", "fine"] and ok.healthy and ok.connects == 1
    with pytest.raises(ValueError, match="channels"):
        Listener(conninfo, [], flaky)
