"""Every store passes the conformance suite (in-memory, SQLite, PostgreSQL); the SQLite store also persists
and guards its schema. PostgreSQL's own behaviour (concurrent writers, reconnects) is in test_postgres_store.py."""

from __future__ import annotations

import sqlite3

import pytest

from kem.errors import StoreError
from kem.stores.in_memory import InMemoryStore
from kem.stores.sqlite import SQLiteStore
from tests.store_conformance import StoreConformance, mk


class TestInMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self):
        return InMemoryStore()


class TestDurableStores(StoreConformance):
    """The same suite on both durable backends: SQLite (a file) and PostgreSQL (a real server, a fresh schema)."""

    @pytest.fixture(params=["sqlite", "postgresql"])
    def store(self, request, tmp_path):
        if request.param == "sqlite":
            s = SQLiteStore(tmp_path / "edits.sqlite")
        else:
            from kem.stores import open_store

            s = open_store(url=request.getfixturevalue("pg_url"), home=tmp_path)
        yield s
        s.close()


def test_sqlite_persists_across_connections(tmp_path):
    s = SQLiteStore(tmp_path / "e.sqlite")
    a = s.add(mk())
    s.delete(s.add(mk("Other")).id)
    s.close()
    s2 = SQLiteStore(tmp_path / "e.sqlite")
    assert [e.id for e in s2.list()] == [a.id] and s2.get(a.id) == a
    assert s2.revision() == 3
    s2.close()


def test_sqlite_refuses_a_newer_schema(tmp_path):
    SQLiteStore(tmp_path / "e.sqlite").close()
    db = sqlite3.connect(tmp_path / "e.sqlite")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteStore(tmp_path / "e.sqlite")


def test_sqlite_schema_2_gets_the_search_column_filled_on_open(tmp_path):
    """A store written before the text filter (schema 2: no ``search`` column) is migrated on open: its
    edits are found by text, and later writes keep the column current."""
    s = SQLiteStore(tmp_path / "e.sqlite")
    a = s.add(mk("Léon Blum", "German", paraphrases=["Blum grew up speaking"]))
    s.close()
    db = sqlite3.connect(tmp_path / "e.sqlite")  # back to what schema 2 had: no search column, no text index
    for trigger in ("edits_fts_ai", "edits_fts_ad", "edits_fts_au"):
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("DROP TABLE edits_fts")
    db.execute("ALTER TABLE edits DROP COLUMN search")
    db.execute("UPDATE schema_version SET version = 2")
    db.commit()
    db.close()
    s = SQLiteStore(tmp_path / "e.sqlite")
    assert [e.id for e in s.list(text="LÉON")] == [a.id] and [e.id for e in s.list(text="grew up")] == [a.id]
    s.update(a.id, {"target_new": "Polish"})
    assert s.count(text="polish") == 1 and s.count(text="german") == 0
    assert s._db.execute("SELECT version FROM schema_version").fetchone()[0] == 3
    s.delete(a.id)
    assert s.count(text="polish") == 0 and s.count(text="blum") == 0  # the index follows deletes
    s.close()


def test_sqlite_without_fts5_scans_the_search_column(tmp_path, monkeypatch):
    """A SQLite without FTS5's trigram tokenizer: the store opens and the text filter scans instead."""
    import kem.stores.sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "_FTS", ["CREATE VIRTUAL TABLE edits_fts USING no_such_module(search)"])
    s = SQLiteStore(tmp_path / "e.sqlite")
    assert s._fts is False
    s.add_many([mk("Widget 1"), mk("Widget 12"), mk("Gadget")])
    assert s.count(text="widget 1") == 2 and s.count(text="t") == 3 and s.count(text="Gadg") == 1
    s.close()


def test_sqlite_wal_mode(tmp_path):
    s = SQLiteStore(tmp_path / "e.sqlite")
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_sqlite_writes_are_durable_by_default(tmp_path, monkeypatch):
    """``synchronous=FULL`` (2) on the real file unless the setting trades it for NORMAL (1)."""
    from kem.errors import ValidationError
    from kem.settings import Settings

    s = SQLiteStore(tmp_path / "e.sqlite")
    s.add(mk())
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    s.close()
    monkeypatch.setenv("KEM_SQLITE_SYNCHRONOUS", "NORMAL")
    s = SQLiteStore(tmp_path / "e.sqlite", synchronous=Settings().sqlite_synchronous)
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 1 and len(s.list()) == 1
    s.close()
    monkeypatch.delenv("KEM_SQLITE_SYNCHRONOUS")
    assert Settings().sqlite_synchronous == "FULL"
    with pytest.raises(ValidationError, match="SQLiteStore.synchronous must be one of FULL, NORMAL"):
        SQLiteStore(tmp_path / "e.sqlite", synchronous="OFF")  # type: ignore[arg-type]
