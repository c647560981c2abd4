"""The shared edit store: PostgreSQL (psycopg 3 + a connection pool), for several kem replicas on one
edit memory. Select it with ``KEM_STORE=postgresql://...`` or ``--store URL`` (:func:`kem.stores.open_store`).

Tables (in one PostgreSQL schema, ``kem`` by default; ``?schema=NAME`` in the URL or ``schema=`` picks
another, so tests and deployments can share a database):

- ``edits``: current state, one JSON document per edit plus the indexed columns (as in SQLite).
- ``history``: append-only (add, update, delete, supersede, consolidate) with a snapshot; ``seq`` is the
  store's revision.
- ``embeddings``: retrieval-key vectors per embedder (``bytea`` of float32 rows).
- ``revision``: one row holding the last ``seq`` handed out. Every write transaction locks it first
  (``SELECT ... FOR UPDATE``), so writers from any number of connections and processes run one after
  the other, like SQLite's ``BEGIN IMMEDIATE``: a ``seq`` never commits after a larger one is visible,
  and ``changes_since(r)`` never misses a change (a plain sequence would allow that with concurrent
  writers). The lock also makes the supersede check race-free.
- ``schema_version``; :mod:`kem.stores.pg_keys` adds ``api_keys`` and :mod:`kem.stores.pg_lock` adds
  ``job_lock`` in the same schema.

Each write transaction also sends ``NOTIFY kem_changes, '<schema>:<seq>'`` (delivered at commit), so a
replica can ``LISTEN`` instead of polling ``changes_since``.

The rules (updatable fields, supersede, fact keys, vector checks) come from :mod:`kem.stores.rules`,
shared with the SQLite and in-memory stores; all three pass ``tests/store_conformance.py``.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from kem.edit import Edit, EditStatus, utcnow
from kem.errors import ConflictError, NotFoundError, StoreError, StoreUnavailable, ValidationError
from kem.protocols import Change
from kem.provenance import current_actor
from kem.stores.rules import (
    LIVE,
    Matches,
    apply_update,
    check_policy,
    check_vectors,
    fact_key,
    hinted,
    resolve,
    review_transition,
    same_fact,
    stamp,
    statuses,
)
from kem.stores.services import PostgresServices

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: history.actor (who made each change); 3: edits.search (the text filter's haystack)
DEFAULT_SCHEMA = "kem"
NOTIFY_CHANNEL = "kem_changes"
SMALL_BATCH = 16  # add_many of at most this many edits uses INSERTs; larger ones COPY
POOL_RETRY_S = 0.25  # a request waiting for a connection asks the pool again this often (_getconn)
SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revision (one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), seq BIGINT NOT NULL);
INSERT INTO revision (one, seq) VALUES (TRUE, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS edits (
    pk BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    subject_key TEXT NOT NULL,
    relation_key TEXT NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS edits_ns_status ON edits (namespace, status, pk);
ALTER TABLE edits ADD COLUMN IF NOT EXISTS search TEXT GENERATED ALWAYS AS (lower(id || chr(10) || coalesce(data::jsonb->>'subject', '') || chr(10) || coalesce(data::jsonb->>'prompt', '') || chr(10) || coalesce(data::jsonb->>'target_new', '') || chr(10) || coalesce(data::jsonb->>'target_true', '') || chr(10) || coalesce(data::jsonb->>'paraphrases', ''))) STORED;
CREATE INDEX IF NOT EXISTS edits_fact ON edits (namespace, subject_key, relation_key, status);
CREATE TABLE IF NOT EXISTS history (
    seq BIGINT PRIMARY KEY,
    edit_id TEXT NOT NULL,
    namespace TEXT NOT NULL,
    op TEXT NOT NULL,
    at TEXT NOT NULL,
    snapshot TEXT
);
CREATE INDEX IF NOT EXISTS history_edit ON history (edit_id, seq);
ALTER TABLE history ADD COLUMN IF NOT EXISTS actor TEXT;
CREATE INDEX IF NOT EXISTS history_ns ON history (namespace, seq);
CREATE TABLE IF NOT EXISTS embeddings (
    edit_id TEXT NOT NULL,
    embedder TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vectors BYTEA NOT NULL,
    PRIMARY KEY (edit_id, embedder)
)
"""


def check_schema_name(schema: str) -> str:
    if not SCHEMA_RE.fullmatch(schema):
        raise ValidationError(f"PostgreSQL schema name must match {SCHEMA_RE.pattern} (got {schema!r})",
                              field="schema")
    return schema


def ensure_tables(conn: Any, schema: str, statements: Sequence[str]) -> None:
    """Create ``schema`` and run ``statements`` (``CREATE ... IF NOT EXISTS``) in one transaction under an
    advisory lock: concurrent ``IF NOT EXISTS`` can still collide in PostgreSQL's catalogs (replicas or
    jobs starting together), so every creator of kem's tables takes the same lock first. Leaves the
    connection's ``search_path`` on ``schema``."""
    from psycopg import sql

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"kem-schema:{schema}",))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        for stmt in statements:
            conn.execute(stmt)


_CHANGE_COLS = "seq, edit_id, namespace, op, at, snapshot, actor"
_INSERT_HISTORY = f"INSERT INTO history ({_CHANGE_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s)"
_SERVER_GONE = {"57P01", "57P02", "57P03"}  # admin_shutdown, crash_shutdown, cannot_connect_now


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _connect_error(url: str, exc: Exception) -> StoreUnavailable:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreUnavailable(f"the PostgreSQL edit store at {redact(url)} is unreachable: {first}")


class _Tx:
    """One write transaction: its cursor and the last seq it handed out."""

    def __init__(self, cur: Any, seq: int) -> None:
        self.cur = cur
        self.seq = seq

    def log_row(self, e: Edit, op: str) -> tuple[int, str, str, str, str, str, str]:
        """The next history row (takes the next seq)."""
        self.seq += 1
        return (self.seq, e.id, e.namespace, op, utcnow().isoformat(), e.model_dump_json(), current_actor())

    def log(self, e: Edit, op: str) -> None:
        self.cur.execute(_INSERT_HISTORY, self.log_row(e, op))


class PostgresStore:
    """:class:`~kem.protocols.EditStore` on PostgreSQL; safe for many threads and processes at once.

    Args:
        url: A libpq connection URL (``postgresql://user:pass@host:5432/db``).
        schema: The PostgreSQL schema holding kem's tables (created on first connect).
        pool_size: Most connections this store opens.
        timeout: Seconds to wait for a connection before a call fails with
            :class:`~kem.errors.StoreUnavailable` (the server is down or every connection is busy).
    """

    def __init__(self, url: str, schema: str = DEFAULT_SCHEMA, *, pool_size: int = 4, timeout: float = 10.0) -> None:
        import psycopg
        from psycopg import sql
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.url = url
        self.schema = check_schema_name(schema)
        self.timeout = timeout
        self._written = 0  # the last seq this object committed (written_revision)
        self._written_lock = threading.Lock()
        self._psycopg = psycopg
        self._pool_timeout = PoolTimeout
        set_path = sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema))

        def configure(conn: Any) -> None:
            conn.execute(set_path)

        try:  # one direct connection first: an unreachable server fails now, with libpq's own reason
            psycopg.connect(url, connect_timeout=max(1, int(timeout))).close()
        except psycopg.Error as exc:
            raise _connect_error(url, exc) from exc
        try:
            self._pool = ConnectionPool(
                url, min_size=1, max_size=max(1, pool_size), timeout=timeout, open=False, name=f"kem-{schema}",
                kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))}, configure=configure,
                check=ConnectionPool.check_connection, reconnect_timeout=0)
            self._pool.open(wait=True, timeout=timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise _connect_error(url, exc) from exc
        try:
            self._create_schema()
        except BaseException:
            self._pool.close()
            raise

    # -- connections
    def _getconn(self) -> Any:
        """A connection from the pool within :attr:`timeout`, asking again every :data:`POOL_RETRY_S`: the pool
        (``reconnect_timeout=0``) gives up a failed connection attempt, and only a new request makes it try
        again, so a request that waits while the database restarts gets a connection soon after it is back
        instead of running out its whole wait."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return self._pool.getconn(timeout=max(0.001, min(POOL_RETRY_S, left)))
            except self._pool_timeout:
                if left <= POOL_RETRY_S:
                    raise

    @contextmanager
    def _pooled(self) -> Iterator[Any]:
        """``ConnectionPool.connection()`` with :meth:`_getconn`'s wait."""
        conn = self._getconn()
        try:
            with conn:
                yield conn
        finally:
            self._pool.putconn(conn)

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        """A pooled connection (autocommit); a lost or refused connection becomes
        :class:`~kem.errors.StoreUnavailable` (503), another operational error :class:`StoreError`."""
        try:
            with self._pooled() as conn:
                yield conn
        except self._pool_timeout as exc:
            raise _connect_error(self.url, exc) from exc
        except self._psycopg.OperationalError as exc:
            state = getattr(exc, "sqlstate", None)
            if state is None or state.startswith("08") or state in _SERVER_GONE:  # the connection, not the query
                raise _connect_error(self.url, exc) from exc
            raise StoreError(f"the PostgreSQL edit store at {redact(self.url)} failed: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[_Tx]:
        """A write transaction holding the revision lock: writers run one at a time, in seq order.
        The seqs it hands out (:meth:`_Tx.log_row`) are saved to ``revision`` before commit."""
        with self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT seq FROM revision FOR UPDATE")
            start = int(cur.fetchone()[0])
            tx = _Tx(cur, start)
            yield tx
            if tx.seq != start:  # one round trip: the new revision and its notification
                cur.execute("WITH r AS (UPDATE revision SET seq = %s RETURNING seq) SELECT pg_notify(%s, %s) FROM r",
                            (tx.seq, NOTIFY_CHANNEL, f"{self.schema}:{tx.seq}"))
        if tx.seq != start:  # committed
            with self._written_lock:
                self._written = max(self._written, tx.seq)

    def _create_schema(self) -> None:
        with self._conn() as conn, conn.transaction():
            # concurrent first connects (several replicas starting) create the tables once
            ensure_tables(conn, self.schema, [stmt for stmt in _DDL.strip().split(";") if stmt.strip()])
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(f"{redact(self.url)} schema {self.schema!r} has schema version {row[0]}; "
                                 f"this kem reads up to {SCHEMA_VERSION}: upgrade kem")
            elif row[0] < SCHEMA_VERSION:  # the DDL above added what is new (history.actor, edits.search)
                conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))

    @property
    def services(self) -> PostgresServices:
        """What every replica on this schema shares: keys, versions, the job lock, notifications."""
        return PostgresServices(self.url, self.schema)

    def connection(self) -> Any:
        """A pooled connection (context manager) for kem's other tables in this schema (keys, locks)."""
        return self._conn()

    def shared_limits(self, lease: float = 330.0, window: float = 60.0) -> Any:
        """Rate and concurrency limits every replica on this store shares (:mod:`kem.stores.pg_limits`);
        ``lease``: seconds a request in flight holds its slot if its replica dies."""
        from kem.stores.pg_limits import SharedBuckets

        return SharedBuckets(self.connection, self.schema, lease, window)

    # -- helpers
    @staticmethod
    def _check_text(e: Edit) -> None:
        """PostgreSQL text cannot hold NUL (the JSON document escapes it; the indexed columns cannot)."""
        ns, subj, rel = fact_key(e)
        for name, value in (("id", e.id), ("namespace", ns), ("subject", subj), ("relation", rel)):
            if "\x00" in value:
                raise ValidationError(f"Edit.{name} of edit {e.id!r} contains a NUL character, which PostgreSQL "
                                      "cannot store: remove it", field=name)

    @staticmethod
    def _edit_row(e: Edit) -> tuple[str, str, str, str, str, str]:
        ns, subj, rel = fact_key(e)
        return (e.id, ns, subj, rel, e.status.value, e.model_dump_json())

    def _update_rows(self, cur: Any, edits: Sequence[Edit]) -> None:
        if edits:
            cur.executemany("UPDATE edits SET namespace=%s, subject_key=%s, relation_key=%s, status=%s, data=%s "
                            "WHERE id=%s", [(*self._edit_row(e)[1:], e.id) for e in edits])

    @staticmethod
    def _get(cur: Any, edit_id: str, namespace: str | None, lock: bool = False) -> Edit:
        cur.execute("SELECT data, namespace FROM edits WHERE id=%s" + (" FOR UPDATE" if lock else ""), (edit_id,))
        row = cur.fetchone()
        if row is None or (namespace is not None and row[1] != namespace):
            raise NotFoundError(f"no edit with id {edit_id!r}" + (f" in namespace {namespace!r}" if namespace else ""))
        return Edit.model_validate_json(row[0])

    # -- writes
    def add(self, edit: Edit, embeddings: np.ndarray | None = None, embedder: str | None = None) -> Edit:
        return self.add_many([edit], None if embeddings is None else [embeddings], embedder)[0]

    def add_many(self, edits: Sequence[Edit], embeddings: Sequence[np.ndarray] | None = None,
                 embedder: str | None = None, *, on_conflict: str = "supersede",
                 matches: Matches | None = None) -> list[Edit]:
        """Add edits in one transaction (all or nothing), with COPY for the rows: a batch of 10,000
        is a handful of round trips."""
        policy = check_policy(on_conflict)
        edits = [stamp(Edit.parse(e)) for e in edits]
        if embeddings is not None and not embedder:
            raise ValidationError("embedder must be named when embeddings are given", field="embedder")
        vecs = [check_vectors(e, v) for e, v in zip(edits, embeddings or [None] * len(edits), strict=True)]  # type: ignore[list-item]
        for e in edits:
            self._check_text(e)
        ids = [e.id for e in edits]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise ConflictError(f"an edit with id {i!r} already exists")
            seen.add(i)
        if not edits:
            return []
        with self._tx() as tx:
            cur = tx.cur
            # one query: an id that exists already (a conflict), and the live edits about the batch's
            # subjects (the ones stating the same facts are superseded, in order)
            keys = {(e.namespace, e.subject_key) for e in edits if e.status in LIVE}
            ns, subj = (list(x) for x in zip(*keys, strict=True)) if keys else ([], [])
            cur.execute(
                "(SELECT 0, id, 0 FROM edits WHERE id = ANY(%s) LIMIT 1) UNION ALL "
                "(SELECT 1, e.data, e.pk FROM edits e JOIN unnest(%s::text[], %s::text[]) AS k(ns, s) "
                "ON e.namespace = k.ns AND e.subject_key = k.s "
                "WHERE e.status IN ('active', 'consolidated')) ORDER BY 1, 3", (ids, ns, subj))
            found = cur.fetchall()
            if found and found[0][0] == 0:
                raise ConflictError(f"an edit with id {found[0][1]!r} already exists")
            about: dict[tuple[str, str], list[str]] = {}  # (namespace, subject key) -> ids, oldest first
            final: dict[str, Edit] = {}  # id -> latest state of every edit this batch reads or writes
            for _, data, _pk in found:
                old = Edit.model_validate_json(data)
                about.setdefault((old.namespace, old.subject_key), []).append(old.id)
                final[old.id] = old
            existing = set(final)
            retired_existing: dict[str, Edit] = {}
            history: list[tuple[int, str, str, str, str, str, str]] = []
            out: list[Edit] = []
            for e in edits:
                if e.status in LIVE:
                    hint = hinted(matches, e.id)
                    cands = [final[i] for i in about.get((e.namespace, e.subject_key), [])]
                    same = same_fact(e, [o for o in cands if fact_key(o) == fact_key(e) or o.id in hint])
                    e, changed = resolve(e, same, policy)
                    for old in changed:
                        final[old.id] = old
                        if old.id in existing:
                            retired_existing[old.id] = old
                        history.append(tx.log_row(old, "supersede"))
                about.setdefault((e.namespace, e.subject_key), []).append(e.id)
                final[e.id] = e
                history.append(tx.log_row(e, "add"))
                out.append(e)
            self._update_rows(cur, list(retired_existing.values()))
            try:
                rows = [self._edit_row(final[e.id]) for e in edits]
                if len(rows) <= SMALL_BATCH:  # a few rows: pipelined INSERTs, fewer round trips than COPY
                    cur.executemany("INSERT INTO edits (id, namespace, subject_key, relation_key, status, data) "
                                    "VALUES (%s,%s,%s,%s,%s,%s)", rows)
                    cur.executemany(_INSERT_HISTORY, history)
                else:
                    with cur.copy("COPY edits (id, namespace, subject_key, relation_key, status, data) "
                                  "FROM STDIN") as cp:
                        for row in rows:
                            cp.write_row(row)
                    with cur.copy(f"COPY history ({_CHANGE_COLS}) FROM STDIN") as cp:
                        for hrow in history:
                            cp.write_row(hrow)
                if any(v is not None for v in vecs):
                    with cur.copy("COPY embeddings (edit_id, embedder, dim, vectors) FROM STDIN") as cp:
                        for e, v in zip(out, vecs, strict=True):
                            if v is not None:
                                cp.write_row((e.id, embedder, v.shape[1], v.tobytes()))
            except self._psycopg.errors.UniqueViolation as exc:  # the check above makes this unlikely
                raise ConflictError(f"an edit in this batch already exists ({exc.diag.message_detail})") from exc
            except self._psycopg.DataError as exc:
                raise ValidationError(f"PostgreSQL refused an edit of this batch: {exc}", field="edits") from exc
        return [final[e.id] for e in out]

    def update(self, edit_id: str, changes: dict[str, Any], namespace: str | None = None) -> Edit:
        with self._tx() as tx:
            new = apply_update(self._get(tx.cur, edit_id, namespace, lock=True), changes)
            self._check_text(new)
            self._update_rows(tx.cur, [new])
            tx.cur.execute("DELETE FROM embeddings WHERE edit_id=%s", (edit_id,))  # text may have changed
            tx.log(new, "update")
        return new

    def delete(self, edit_id: str, namespace: str | None = None) -> Edit:
        with self._tx() as tx:
            e = self._get(tx.cur, edit_id, namespace, lock=True)
            tx.cur.execute("DELETE FROM edits WHERE id=%s", (edit_id,))
            tx.cur.execute("DELETE FROM embeddings WHERE edit_id=%s", (edit_id,))
            tx.log(e, "delete")
        return e

    def _place(self, tx: _Tx, e: Edit, policy: Any, matches: Sequence[str]) -> Edit:
        """Resolve ``e`` against the live edits of the same fact (exact key or matched); writes the old ones."""
        tx.cur.execute("SELECT data FROM edits WHERE namespace=%s AND subject_key=%s "
                       "AND status IN ('active', 'consolidated') ORDER BY pk FOR UPDATE", (e.namespace, e.subject_key))
        live = [Edit.model_validate_json(r[0]) for r in tx.cur.fetchall()]
        e, changed = resolve(e, same_fact(e, [o for o in live if fact_key(o) == fact_key(e) or o.id in matches]),
                             policy)
        self._update_rows(tx.cur, changed)
        for old in changed:
            tx.log(old, "supersede")
        return e

    def review(self, edit_id: str, approve: bool, namespace: str | None = None, *,
               matches: Sequence[str] = (), on_conflict: str = "supersede") -> Edit:
        policy = check_policy(on_conflict)
        with self._tx() as tx:
            e = review_transition(self._get(tx.cur, edit_id, namespace, lock=True), approve)
            if approve:
                e = self._place(tx, e, policy, matches)
            self._update_rows(tx.cur, [e])
            tx.log(e, "approve" if approve else "reject")
        return e

    def mark_consolidated(self, edit_ids: Sequence[str], version: str) -> None:
        ids = list(dict.fromkeys(edit_ids))
        if not ids:
            return
        with self._tx() as tx:
            cur = tx.cur
            cur.execute("SELECT id, data FROM edits WHERE id = ANY(%s) ORDER BY pk", (ids,))
            found = {i: Edit.model_validate_json(d) for i, d in cur.fetchall()}
            missing = next((i for i in ids if i not in found), None)
            if missing is not None:
                raise NotFoundError(f"no edit with id {missing!r}")
            now = utcnow()
            marked = [found[i].model_copy(update={"status": EditStatus.consolidated, "consolidated_in": version,
                                                  "updated_at": now}) for i in ids]
            self._update_rows(cur, marked)
            cur.executemany(_INSERT_HISTORY, [tx.log_row(e, "consolidate") for e in marked])

    def put_embeddings(self, edit_id: str, embedder: str, vectors: np.ndarray) -> None:
        with self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            v = check_vectors(self._get(cur, edit_id, None, lock=True), vectors)
            assert v is not None
            cur.execute("INSERT INTO embeddings (edit_id, embedder, dim, vectors) VALUES (%s,%s,%s,%s) "
                        "ON CONFLICT (edit_id, embedder) DO UPDATE SET dim = EXCLUDED.dim, vectors = EXCLUDED.vectors",
                        (edit_id, embedder, v.shape[1], v.tobytes()))

    # -- reads
    def get(self, edit_id: str, namespace: str | None = None) -> Edit:
        with self._conn() as conn, conn.cursor() as cur:
            return self._get(cur, edit_id, namespace)

    @staticmethod
    def _where(namespace: str | None, status: Any, text: str | None = None,
               subject: str | None = None) -> tuple[str, builtins.list[Any]]:
        clauses: builtins.list[str] = []
        args: builtins.list[Any] = []
        if subject is not None:
            clauses.append("subject_key = %s")
            args.append(subject.casefold())
        if text:  # a substring of the lower-cased search text (a generated column)
            clauses.append("strpos(search, lower(%s)) > 0")
            args.append(text)
        if namespace is not None:
            clauses.append("namespace = %s")
            args.append(namespace)
        want = statuses(status)
        if want is not None:
            clauses.append("status = ANY(%s)")
            args.append([s.value for s in want])
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def _rows(self, query: str, args: Sequence[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(query, args).fetchall()  # type: ignore[no-any-return]

    def list(self, namespace: str | None = None, status: Any = None, limit: int | None = None,
             offset: int = 0, *, text: str | None = None, subject: str | None = None) -> builtins.list[Edit]:
        where, args = self._where(namespace, status, text, subject)
        rows = self._rows(f"SELECT data FROM edits{where} ORDER BY pk LIMIT %s OFFSET %s", [*args, limit, offset])
        return [Edit.model_validate_json(r[0]) for r in rows]

    def live_for_subjects(self, keys: Sequence[tuple[str, str]]) -> builtins.list[Edit]:
        pairs = list(dict.fromkeys(keys))
        if not pairs:
            return []
        ns, subj = (list(x) for x in zip(*pairs, strict=True))
        rows = self._rows("SELECT e.data FROM edits e JOIN unnest(%s::text[], %s::text[]) AS k(ns, s) "
                          "ON e.namespace = k.ns AND e.subject_key = k.s "
                          "WHERE e.status IN ('active', 'consolidated') ORDER BY e.pk", (ns, subj))
        return [Edit.model_validate_json(r[0]) for r in rows]

    def audit(self, namespace: str | None = None, since: int = 0, limit: int | None = None) -> builtins.list[Change]:
        q = f"SELECT {_CHANGE_COLS} FROM history WHERE seq > %s"
        args: list[Any] = [since]
        if namespace is not None:
            q += " AND namespace=%s"
            args.append(namespace)
        rows = self._rows(q + " ORDER BY seq LIMIT %s", [*args, limit])
        return [self._change(r) for r in rows]

    def count(self, namespace: str | None = None, status: EditStatus | None = None, *,
              text: str | None = None, subject: str | None = None) -> int:
        where, args = self._where(namespace, status, text, subject)
        return int(self._rows(f"SELECT COUNT(*) FROM edits{where}", args)[0][0])

    def namespaces(self) -> builtins.list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT namespace FROM edits ORDER BY namespace")]

    @staticmethod
    def _change(row: tuple[Any, ...]) -> Change:
        return Change(int(row[0]), row[1], row[2], row[3], row[4], json.loads(row[5]) if row[5] else None, row[6])

    def history(self, edit_id: str, namespace: str | None = None) -> builtins.list[Change]:
        q = f"SELECT {_CHANGE_COLS} FROM history WHERE edit_id=%s"
        args: list[Any] = [edit_id]
        if namespace is not None:
            q += " AND namespace=%s"
            args.append(namespace)
        rows = self._rows(q + " ORDER BY seq", args)
        if not rows:
            raise NotFoundError(f"no history for edit {edit_id!r}" + (f" in namespace {namespace!r}" if namespace else ""))
        return [self._change(r) for r in rows]

    def revision(self) -> int:
        return int(self._rows("SELECT seq FROM revision")[0][0])

    @property
    def written_revision(self) -> int:
        """The last revision this store object committed (0: none yet): no query. A replica that learns
        the others' revisions from notifications (:class:`kem.sync.Syncer`) adds its own writes with it,
        so a write through a replica is visible to that replica's next read."""
        return self._written

    def changes_since(self, revision: int) -> builtins.list[Change]:
        return self.audit(None, revision)

    def embeddings(self, edit_ids: Sequence[str], embedder: str) -> dict[str, np.ndarray]:
        ids = list(edit_ids)
        if not ids:
            return {}
        rows = self._rows("SELECT edit_id, dim, vectors FROM embeddings WHERE embedder=%s AND edit_id = ANY(%s)",
                          (embedder, ids))
        return {i: np.frombuffer(bytes(blob), dtype=np.float32).reshape(-1, dim) for i, dim, blob in rows}

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore({redact(self.url)!r}, schema={self.schema!r})"
