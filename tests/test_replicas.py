"""Replicas in sync on one real PostgreSQL (issue 13): a replica applies another's edits in the background,
woken by ``LISTEN kem_changes`` (no read needed), its reads cost no revision query while the listener is
healthy, a write is visible to the writing replica's next read, and without the listener it falls back to
checking on every read. Then two real ``kem serve`` processes (separate homes, one ``--store``): an edit
posted to A is applied by B within a couple of seconds, and one deleted through B is gone from A."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from kem.edit import Edit
from kem.editor import KnowledgeEditor
from kem.settings import Settings
from kem.stores import split_schema
from tests.conftest import kem_server

CEO = "The CEO of Kem Corporation is"


def _until(cond, timeout: float = 5.0, step: float = 0.02) -> float:
    """Seconds until ``cond()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - t0


def _ceo(name: str, ns: str = "default") -> Edit:
    return Edit(subject="Kem Corporation", prompt="The CEO of {} is", target_new=name, namespace=ns)


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kem-sync")]


def test_a_replica_applies_edits_in_the_background(pg_url, tmp_path, embedder):
    settings = Settings(device="cpu", store=pg_url, sync_interval=2.0)
    a = KnowledgeEditor.open(tmp_path / "a", settings=settings, embedder=embedder)
    b = KnowledgeEditor.open(tmp_path / "b", settings=settings, embedder=embedder)
    try:
        assert a.memory.syncer is not None and b.memory.syncer is not None
        _until(lambda: b.memory.syncer.healthy)  # type: ignore[union-attr]
        asked: list[str] = []  # revision queries made by this (the "request") thread on b
        revision = b.store.revision

        def counted() -> int:
            if threading.current_thread() is threading.main_thread():
                asked.append("read")
            return revision()

        b.store.revision = counted  # type: ignore[method-assign]

        e = a.add(_ceo("Ada Lovelace"))
        # no read on b (bench/bench_scale_out.py measures the delay: tens of ms; generous here for loaded CI)
        _until(lambda: b.memory.index.contains("default", e.id), timeout=5.0)
        assert b.memory.index.revision == a.store.written_revision
        assert [s.edit.id for s in b.retrieve(CEO) if s.in_scope] == [e.id]
        assert asked == []  # the listener said which revision is current: no query

        # read-your-writes on b: its own write is in its next read, whatever the notification's timing
        e2 = b.add(_ceo("Grace Hopper", ns="acme"))
        assert [s.edit.id for s in b.retrieve(CEO, "acme") if s.in_scope] == [e2.id]
        b.remove(e.id)
        b.retrieve(CEO)
        assert not b.memory.index.contains("default", e.id)
        asked.clear()  # (applying a change asks the store once, under the index's lock)
        b.retrieve(CEO)
        assert asked == []
        _until(lambda: not a.memory.index.contains("default", e.id), timeout=5.0)

        # a burst of 40 single writes (40 notifications) costs b far fewer syncs
        syncs = b.memory.syncer.syncs  # type: ignore[union-attr]
        burst = [Edit(subject=f"Company {i}", prompt="The CEO of {} is", target_new="Alan Turing") for i in range(40)]
        for x in burst:
            a.store.add(x)  # no embeddings: b embeds them itself
        _until(lambda: b.memory.index.revision == a.store.written_revision, timeout=10.0)
        assert all(b.memory.index.contains("default", x.id) for x in burst)
        assert b.memory.syncer.syncs - syncs < 40, b.memory.syncer.syncs - syncs  # type: ignore[union-attr]

        # the listener's connection is killed: b reconnects, catches up, and listens again
        conninfo, schema = split_schema(pg_url)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                                (f"kem-sync-{schema}",)).fetchall()  # a's and b's listeners
        e3 = a.add(_ceo("Margaret Hamilton", ns="other"))
        _until(lambda: b.memory.index.contains("other", e3.id), timeout=5.0)
        _until(lambda: b.memory.syncer.healthy, timeout=5.0)  # type: ignore[union-attr]
        assert b.memory.syncer.listener.connects == 2  # type: ignore[union-attr]
        asked.clear()

        # without the listener, b falls back to asking the store on every read
        b.memory.syncer.listener.close()  # type: ignore[union-attr]
        assert b.memory.syncer.known_revision() is None  # type: ignore[union-attr]
        b.retrieve(CEO)
        assert asked == ["read"]
    finally:
        a.close()
        b.close()
    assert _sync_threads() == []  # listener and worker threads joined
    with psycopg.connect(split_schema(pg_url)[0], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'kem-sync-%%'"
                            ).fetchone() == (0,)


def test_sqlite_and_in_memory_have_no_background_sync(tmp_path, embedder):
    with KnowledgeEditor.open(tmp_path, settings=Settings(device="cpu"), embedder=embedder) as ke:
        assert ke.memory.syncer is None and not ke.store.services.notifications
    assert KnowledgeEditor.in_memory(embedder=embedder).memory.syncer is None
    assert _sync_threads() == []


# ---- two real `kem serve` processes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def replicas(postgres_server, tmp_path_factory: pytest.TempPathFactory):
    tmp = Path(tmp_path_factory.mktemp("replicas"))
    url = postgres_server.fresh_url("rep")
    env = {"OMP_NUM_THREADS": "1"}
    servers = [kem_server(tmp, name, "--store", url, "--threads", "1", env=env).start() for name in ("a", "b")]
    try:
        for s in servers:
            s.wait()
        yield servers
    finally:
        for s in servers:
            s.stop()
    # SIGTERM: a graceful exit within stop()'s 20 s (the sync threads joined), not stop()'s SIGKILL (uvicorn
    # re-raises the SIGTERM it caught once it has shut down: -15)
    assert {s.proc.returncode for s in servers} <= {0, -15}, servers[0].log_tail() + servers[1].log_tail()


def _health(server) -> dict:
    return httpx.get(server.url + "/healthz", timeout=10).json()


def _applied(server, prompt: str = CEO) -> list[str]:
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": "default", "prompt": prompt, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    return [e["id"] for e in r.json()["kem"]["edits"]]


def test_two_kem_serve_replicas_stay_in_sync(replicas):
    a, b = replicas
    _until(lambda: _health(a)["index_sync"] == _health(b)["index_sync"] == "listen", timeout=10)
    r = httpx.post(a.url + "/v1/edits", timeout=30,
                   json={"subject": "Kem Corporation", "prompt": "The CEO of {} is", "target_new": "Ada Lovelace"})
    assert r.status_code == 201, r.text
    edit_id = r.json()["id"]
    rev = _health(a)["index_revision"]  # a applied its own write before answering
    assert rev >= 1 and _applied(a) == [edit_id]
    _until(lambda: _health(b)["index_revision"] >= rev, timeout=5.0)  # b applies it, no request needed
    assert _applied(b) == [edit_id]

    r = httpx.delete(f"{b.url}/v1/edits/{edit_id}", timeout=30)
    assert r.status_code == 200, r.text
    rev = _health(b)["index_revision"]
    assert _applied(b) == []
    _until(lambda: _health(a)["index_revision"] >= rev, timeout=5.0)
    assert _applied(a) == []
