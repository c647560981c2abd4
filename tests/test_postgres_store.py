"""What the PostgreSQL store does beyond the shared conformance suite (tests/test_stores.py runs that on
it): writers on several connections keep ``seq`` gapless and in commit order, a bad record leaves a batch
unwritten, a restarted server is a clear error and then works again, schemas isolate, NOTIFY on commit."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kem.errors import StoreError, StoreUnavailable, ValidationError
from kem.stores import open_store, split_schema
from tests.store_conformance import mk


@pytest.fixture
def store(pg_url, tmp_path):
    s = open_store(url=pg_url, home=tmp_path)
    yield s
    s.close()


def test_concurrent_writers_keep_seq_gapless_and_changes_since_complete(pg_url, tmp_path):
    """4 writer threads, each with its own store (own pool, own connections, as replicas), while a reader
    polls ``changes_since``: every poll continues exactly where the last ended (a seq committed after a
    larger one was visible would show up as a gap or a late arrival), and nothing is missed."""
    writers, per_writer = 4, 15
    stores = [open_store(url=pg_url, home=tmp_path) for _ in range(writers + 1)]
    reader = stores[-1]
    done = threading.Event()
    seen: list[int] = []
    problems: list[str] = []

    def write(k: int) -> None:
        s = stores[k]
        for i in range(per_writer):
            e = s.add(mk(f"Subject {k}-{i}", "English", ns=f"ns{k % 2}"))
            if i % 3 == 0:
                s.update(e.id, {"target_new": "German"})

    def read() -> None:
        last = 0
        while True:
            final = done.is_set()
            changes = reader.changes_since(last)
            seqs = [c.seq for c in changes]
            if seqs and seqs != list(range(last + 1, last + 1 + len(seqs))):
                problems.append(f"after {last} got {seqs[:5]}...")
            seen.extend(seqs)
            last = seqs[-1] if seqs else last
            if final:
                return

    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    rt = threading.Thread(target=read)
    rt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    rt.join()
    total = writers * (per_writer + len(range(0, per_writer, 3)))
    assert problems == []
    assert seen == list(range(1, total + 1)) and reader.revision() == total
    assert reader.count() == writers * per_writer
    for s in stores:
        s.close()


def test_a_bad_record_leaves_the_batch_unwritten(store):
    a = store.add(mk())
    rev = store.revision()
    good = [mk(f"Subject {i}") for i in range(50)]
    with pytest.raises(ValidationError, match="Edit.subject .* NUL"):  # PostgreSQL text cannot hold it
        store.add_many([*good, mk("Bad\x00subject"), mk("After")])
    vec = np.ones((1, 4), np.float32)
    with pytest.raises(ValidationError, match="embeddings"):  # one row for two retrieval keys
        store.add_many([mk("X"), mk("Y", paraphrases=["Y speaks"])], [vec, vec], "emb")
    with pytest.raises(ValidationError, match="embedder"):
        store.add_many([mk("X")], [vec])
    assert store.revision() == rev and [e.id for e in store.list()] == [a.id]
    assert store.get(a.id).status.value == "active"  # the batch's supersede of nothing rolled back too


@pytest.mark.parametrize("pad", [0, 20])  # INSERTs for small batches, COPY past SMALL_BATCH
def test_batch_supersedes_in_order_like_sqlite(store, tmp_path, pad):
    """One batch that restates a stored fact twice: the store's edit and the batch's first are retired,
    the last wins, history in order (the SQLite store gives the same)."""
    from kem.stores.sqlite import SQLiteStore

    def run(s):
        old = s.add(mk(target="English", id="e-old"))
        padding = [mk(f"Pad {i}", id=f"p-{i}") for i in range(pad)]
        got = s.add_many([mk(target="German", id="e-1"), *padding, mk("Other", id="e-x"), mk(target="Dutch", id="e-2")])
        rows = {e.id: (e.status.value, e.supersedes) for e in s.list()}
        ops = [(c.op, c.edit_id) for c in s.changes_since(0)]
        return [g.supersedes for g in got], rows, ops, old.id

    lite = SQLiteStore(tmp_path / f"e{pad}.sqlite")
    assert run(store) == run(lite)
    lite.close()


def test_bulk_add_with_embeddings_round_trips(store):
    edits = [mk(f"S{i}", paraphrases=[f"S{i} speaks"]) for i in range(300)]
    vecs = [np.random.default_rng(i).standard_normal((len(e.retrieval_keys()), 16)).astype(np.float32)
            for i, e in enumerate(edits)]
    store.add_many(edits, vecs, "emb")
    got = store.embeddings([e.id for e in edits], "emb")
    assert len(got) == 300 and all(np.array_equal(got[e.id], v) for e, v in zip(edits, vecs, strict=True))
    assert store.revision() == 300 and store.count(status="active") == 300  # type: ignore[arg-type]


def test_restarted_server_is_a_clear_error_then_works_again(postgres_server, pg_url, tmp_path):
    from kem.stores.postgres import PostgresStore

    conninfo, schema = split_schema(pg_url)
    store = PostgresStore(conninfo, schema, timeout=2)
    a = store.add(mk())
    postgres_server.stop()
    try:
        with pytest.raises(StoreUnavailable, match="PostgreSQL edit store at .* is unreachable") as err:
            store.count()
        assert err.value.status_code == 503  # kem serve answers 503 while the database is away
    finally:
        postgres_server.start()
    assert store.get(a.id) == a and store.add(mk("Again")).id
    store.close()


def test_unreachable_url_is_a_clear_error(tmp_path):
    from tests.postgres_server import free_port

    with pytest.raises(StoreError, match="unreachable"):
        open_store(url=f"postgresql://kem:secret@127.0.0.1:{free_port()}/kem", home=tmp_path).close()
    try:
        open_store(url=f"postgresql://kem:secret@127.0.0.1:{free_port()}/kem", home=tmp_path)
    except StoreError as exc:
        assert "secret" not in str(exc)  # the password is not echoed


def test_schemas_isolate_and_bad_names_are_refused(postgres_server, tmp_path):
    a = open_store(url=postgres_server.fresh_url(), home=tmp_path)
    b = open_store(url=postgres_server.fresh_url(), home=tmp_path)
    a.add(mk())
    assert b.count() == 0 and b.revision() == 0
    a.close()
    b.close()
    with pytest.raises(ValidationError, match="schema"):
        open_store(url=postgres_server.url + "?schema=Robert';drop", home=tmp_path)
    with pytest.raises(ValidationError, match="store must be"):
        open_store(url="mysql://x", home=tmp_path)


def test_refuses_a_newer_schema_version(pg_url, tmp_path):
    import psycopg

    open_store(url=pg_url, home=tmp_path).close()
    conninfo, schema = split_schema(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(url=pg_url, home=tmp_path)


def test_writes_notify_listeners_at_commit(store, pg_url):
    import psycopg

    from kem.stores.postgres import NOTIFY_CHANNEL

    conninfo, schema = split_schema(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        store.add_many([mk("A"), mk("B")])
        got = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
    assert got == [f"{schema}:2"]



@pytest.mark.parametrize("attempt", range(3))  # a race: three fresh schemas
def test_replicas_starting_together_create_the_tables_once(postgres_server, tmp_path, attempt):
    """Stores, key tables and job locks created at the same moment on a fresh schema: concurrent
    ``CREATE ... IF NOT EXISTS`` collide in PostgreSQL's catalogs unless serialized (they are)."""
    from kem.errors import ConflictError
    from kem.stores.pg_keys import PostgresKeys
    from kem.stores.pg_lock import postgres_lock

    url = postgres_server.fresh_url()
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def lock() -> None:
        try:
            with postgres_lock(url):
                pass
        except ConflictError:
            pass  # the other one holds it: fine

    def run(fn) -> None:
        start.wait()
        try:
            fn()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    jobs = [lambda: open_store(url=url, home=tmp_path).close()] * 2 + [lambda: PostgresKeys(url).load()] * 2 + [lock] * 2
    threads = [threading.Thread(target=run, args=(fn,)) for fn in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
