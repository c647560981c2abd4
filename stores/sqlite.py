"""The default durable edit store: one SQLite file (WAL), the source of truth for kem.

Tables: ``edits`` (current state, one JSON document per edit plus indexed columns), ``history``
(append-only: every add, update, delete, supersede and consolidation, with a snapshot of the edit),
``embeddings`` (retrieval-key vectors per embedder, so the FAISS index can be rebuilt without
re-embedding) and ``schema_version``. Every mutation runs in one ``BEGIN IMMEDIATE`` transaction:
it lands whole or not at all.

Durability: by default the connection runs with ``synchronous=FULL``, so SQLite syncs the WAL at
every commit and an acknowledged edit survives a power loss or OS crash. Edit writes are rare, so
the fsync per commit is affordable (one-edit writes: 4.4 ms with FULL, 0.4 ms with NORMAL on the dev
machine's disk). ``synchronous="NORMAL"`` (setting ``sqlite_synchronous``,
env ``KEM_SQLITE_SYNCHRONOUS``) skips it: the database stays consistent, but the last commits
before a power loss can be lost.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kem.edit import Edit, EditStatus, utcnow
from kem.errors import ConflictError, NotFoundError, StoreError, ValidationError
from kem.protocols import Change
from kem.provenance import current_actor
from kem.stores.rules import (
    Matches,
    apply_update,
    check_policy,
    check_vectors,
    fact_key,
    hinted,
    resolve,
    review_transition,
    same_fact,
    search_text,
    stamp,
    statuses,
)
from kem.stores.services import LocalStore

SCHEMA_VERSION = 3  # 2: history.actor (who made each change); 3: edits.search (the text filter's haystack)
_CHANGE_COLS = "seq, edit_id, namespace, op, at, snapshot, actor"
SYNCHRONOUS = ("FULL", "NORMAL")  # PRAGMA synchronous levels offered (see the module docstring)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    pk INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    subject_key TEXT NOT NULL,
    relation_key TEXT NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL,
    search TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS edits_ns_status ON edits (namespace, status, pk);
CREATE INDEX IF NOT EXISTS edits_fact ON edits (namespace, subject_key, relation_key, status);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    edit_id TEXT NOT NULL,
    namespace TEXT NOT NULL,
    op TEXT NOT NULL,
    at TEXT NOT NULL,
    snapshot TEXT,
    actor TEXT
);
CREATE INDEX IF NOT EXISTS history_edit ON history (edit_id, seq);
CREATE INDEX IF NOT EXISTS history_ns ON history (namespace, seq);
CREATE TABLE IF NOT EXISTS embeddings (
    edit_id TEXT NOT NULL,
    embedder TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vectors BLOB NOT NULL,
    PRIMARY KEY (edit_id, embedder)
);
"""


# a trigram full-text index over edits.search (SQLite >= 3.34 with FTS5): substring search without a scan
_FTS = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS edits_fts USING fts5(search, content='edits', content_rowid='pk', "
    "tokenize='trigram')",
    "CREATE TRIGGER IF NOT EXISTS edits_fts_ai AFTER INSERT ON edits BEGIN "
    "INSERT INTO edits_fts(rowid, search) VALUES (new.pk, new.search); END",
    "CREATE TRIGGER IF NOT EXISTS edits_fts_ad AFTER DELETE ON edits BEGIN "
    "INSERT INTO edits_fts(edits_fts, rowid, search) VALUES ('delete', old.pk, old.search); END",
    "CREATE TRIGGER IF NOT EXISTS edits_fts_au AFTER UPDATE OF search ON edits BEGIN "
    "INSERT INTO edits_fts(edits_fts, rowid, search) VALUES ('delete', old.pk, old.search); "
    "INSERT INTO edits_fts(rowid, search) VALUES (new.pk, new.search); END",
]


class SQLiteStore(LocalStore):
    """:class:`~kem.protocols.EditStore` in one SQLite file.

    Args:
        path: The database file (created with its parent folder if missing).
        synchronous: ``"FULL"`` (default: every commit is on disk when it returns) or ``"NORMAL"``
            (faster commits; the last ones can be lost on power loss). See the module docstring.
    """

    def __init__(self, path: str | Path, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValidationError(
                f"SQLiteStore.synchronous must be one of {', '.join(SYNCHRONOUS)} (got {synchronous!r})",
                field="synchronous",
            )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")  # one of SYNCHRONOUS, checked above
            self._db.execute("PRAGMA foreign_keys=ON")
            self._lock = threading.RLock()
            with self._tx() as db:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                row = db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} has schema version {row[0]}; this kem reads up to {SCHEMA_VERSION}: upgrade kem"
                    )
                elif row[0] < SCHEMA_VERSION:  # 1: history rows had no actor; 2: edits had no search text
                    cols = {r[1] for r in db.execute("PRAGMA table_info(history)")}
                    if "actor" not in cols:
                        db.execute("ALTER TABLE history ADD COLUMN actor TEXT")
                    if "search" not in {r[1] for r in db.execute("PRAGMA table_info(edits)")}:
                        db.execute("ALTER TABLE edits ADD COLUMN search TEXT NOT NULL DEFAULT ''")
                    for pk, data in db.execute("SELECT pk, data FROM edits").fetchall():
                        db.execute("UPDATE edits SET search=? WHERE pk=?",
                                   (search_text(Edit.model_validate_json(data)), pk))
                    db.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
                # after the search column is filled: an index made now is built from it
                new = db.execute("SELECT 1 FROM sqlite_master WHERE name='edits_fts'").fetchone() is None
                self._fts = self._create_fts(db)
                if self._fts and new:
                    db.execute("INSERT INTO edits_fts(edits_fts) VALUES ('rebuild')")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the edit store {self.path}: {exc}") from exc

    @staticmethod
    def _create_fts(db: sqlite3.Connection) -> bool:
        """The trigram index over ``edits.search`` and its triggers; False when this SQLite lacks FTS5's
        trigram tokenizer (the text filter then scans ``search``)."""
        try:
            db.execute("SAVEPOINT fts")
            for stmt in _FTS:
                db.execute(stmt)
            db.execute("RELEASE fts")
            return True
        except sqlite3.OperationalError:
            db.execute("ROLLBACK TO fts")
            db.execute("RELEASE fts")
            return False

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    # -- helpers
    @staticmethod
    def _log(db: sqlite3.Connection, e: Edit, op: str) -> None:
        db.execute(
            "INSERT INTO history (edit_id, namespace, op, at, snapshot, actor) VALUES (?, ?, ?, ?, ?, ?)",
            (e.id, e.namespace, op, utcnow().isoformat(), e.model_dump_json(), current_actor()),
        )

    @staticmethod
    def _write(db: sqlite3.Connection, e: Edit, insert: bool) -> None:
        ns, subj, rel = fact_key(e)
        if insert:
            db.execute(
                "INSERT INTO edits (id, namespace, subject_key, relation_key, status, data, search) "
                "VALUES (?,?,?,?,?,?,?)",
                (e.id, ns, subj, rel, e.status.value, e.model_dump_json(), search_text(e)),
            )
        else:
            db.execute(
                "UPDATE edits SET namespace=?, subject_key=?, relation_key=?, status=?, data=?, search=? WHERE id=?",
                (ns, subj, rel, e.status.value, e.model_dump_json(), search_text(e), e.id),
            )

    def _get(self, db: sqlite3.Connection, edit_id: str, namespace: str | None) -> Edit:
        row = db.execute("SELECT data, namespace FROM edits WHERE id=?", (edit_id,)).fetchone()
        if row is None or (namespace is not None and row[1] != namespace):
            raise NotFoundError(f"no edit with id {edit_id!r}" + (f" in namespace {namespace!r}" if namespace else ""))
        return Edit.model_validate_json(row[0])

    # -- writes
    def add(self, edit: Edit, embeddings: np.ndarray | None = None, embedder: str | None = None) -> Edit:
        return self.add_many([edit], None if embeddings is None else [embeddings], embedder)[0]

    def _live_of(self, db: sqlite3.Connection, namespace: str, subject_key: str) -> list[Edit]:
        rows = db.execute("SELECT data FROM edits WHERE namespace=? AND subject_key=? "
                          "AND status IN ('active', 'consolidated') ORDER BY pk", (namespace, subject_key)).fetchall()
        return [Edit.model_validate_json(r[0]) for r in rows]

    def _place(self, db: sqlite3.Connection, e: Edit, policy: Any, matches: list[str]) -> Edit:
        """Resolve ``e`` against the live edits of the same fact (exact key or matched); writes the old ones."""
        live = self._live_of(db, e.namespace, e.subject_key)
        found = [o for o in live if fact_key(o) == fact_key(e) or o.id in matches]
        e, changed = resolve(e, same_fact(e, found), policy)
        for old in changed:
            self._write(db, old, insert=False)
            self._log(db, old, "supersede")
        return e

    def add_many(self, edits: Sequence[Edit], embeddings: Sequence[np.ndarray] | None = None,
                 embedder: str | None = None, *, on_conflict: str = "supersede",
                 matches: Matches | None = None) -> list[Edit]:
        policy = check_policy(on_conflict)
        edits = [stamp(Edit.parse(e)) for e in edits]
        if embeddings is not None and not embedder:
            raise ValidationError("embedder must be named when embeddings are given", field="embedder")
        vecs = [check_vectors(e, v) for e, v in zip(edits, embeddings or [None] * len(edits), strict=True)]  # type: ignore[list-item]
        out: list[Edit] = []
        with self._tx() as db:
            for e, v in zip(edits, vecs, strict=True):
                if db.execute("SELECT 1 FROM edits WHERE id=?", (e.id,)).fetchone():
                    raise ConflictError(f"an edit with id {e.id!r} already exists")
                e = self._place(db, e, policy, hinted(matches, e.id))
                self._write(db, e, insert=True)
                if v is not None:
                    db.execute("INSERT OR REPLACE INTO embeddings VALUES (?,?,?,?)",
                               (e.id, embedder, v.shape[1], v.tobytes()))
                self._log(db, e, "add")
                out.append(e)
        return out

    def update(self, edit_id: str, changes: dict[str, Any], namespace: str | None = None) -> Edit:
        with self._tx() as db:
            new = apply_update(self._get(db, edit_id, namespace), changes)
            self._write(db, new, insert=False)
            db.execute("DELETE FROM embeddings WHERE edit_id=?", (edit_id,))  # text may have changed
            self._log(db, new, "update")
        return new

    def delete(self, edit_id: str, namespace: str | None = None) -> Edit:
        with self._tx() as db:
            e = self._get(db, edit_id, namespace)
            db.execute("DELETE FROM edits WHERE id=?", (edit_id,))
            db.execute("DELETE FROM embeddings WHERE edit_id=?", (edit_id,))
            self._log(db, e, "delete")
        return e

    def review(self, edit_id: str, approve: bool, namespace: str | None = None, *,
               matches: Sequence[str] = (), on_conflict: str = "supersede") -> Edit:
        policy = check_policy(on_conflict)
        with self._tx() as db:
            e = review_transition(self._get(db, edit_id, namespace), approve)
            if approve:
                e = self._place(db, e, policy, list(matches))
            self._write(db, e, insert=False)
            self._log(db, e, "approve" if approve else "reject")
        return e

    def mark_consolidated(self, edit_ids: Sequence[str], version: str) -> None:
        with self._tx() as db:
            for i in edit_ids:
                e = self._get(db, i, None).model_copy(
                    update={"status": EditStatus.consolidated, "consolidated_in": version, "updated_at": utcnow()})
                self._write(db, e, insert=False)
                self._log(db, e, "consolidate")

    def put_embeddings(self, edit_id: str, embedder: str, vectors: np.ndarray) -> None:
        with self._tx() as db:
            v = check_vectors(self._get(db, edit_id, None), vectors)
            assert v is not None
            db.execute("INSERT OR REPLACE INTO embeddings VALUES (?,?,?,?)", (edit_id, embedder, v.shape[1], v.tobytes()))

    # -- reads
    def get(self, edit_id: str, namespace: str | None = None) -> Edit:
        with self._lock:
            return self._get(self._db, edit_id, namespace)

    def _where(self, namespace: str | None, status: Any, text: str | None = None,
               subject: str | None = None) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if subject is not None:
            clauses.append("subject_key = ?")
            args.append(subject.casefold())
        if text:  # a substring of the case-folded search text (rules.search_text)
            needle = text.casefold()
            if self._fts and len(needle) >= 3:  # the trigram index finds the rows holding it
                clauses.append("pk IN (SELECT rowid FROM edits_fts WHERE edits_fts MATCH ?)")
                args.append('"' + needle.replace('"', '""') + '"')
            else:
                clauses.append("instr(search, ?) > 0")
                args.append(needle)
        if namespace is not None:
            clauses.append("namespace = ?")
            args.append(namespace)
        want = statuses(status)
        if want is not None:
            clauses.append(f"status IN ({','.join('?' * len(want))})")
            args.extend(s.value for s in want)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def list(self, namespace: str | None = None, status: Any = None, limit: int | None = None,
             offset: int = 0, *, text: str | None = None, subject: str | None = None) -> list[Edit]:
        where, args = self._where(namespace, status, text, subject)
        sql = f"SELECT data FROM edits{where} ORDER BY pk LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, [*args, -1 if limit is None else limit, offset]).fetchall()
        return [Edit.model_validate_json(r[0]) for r in rows]

    def live_for_subjects(self, keys: Sequence[tuple[str, str]]) -> builtins.list[Edit]:
        with self._lock:
            return [e for ns, subj in dict.fromkeys(keys) for e in self._live_of(self._db, ns, subj)]

    def _changes(self, where: str, args: builtins.list[Any], namespace: str | None, limit: int | None = None
                 ) -> builtins.list[Change]:
        """History rows matching ``where`` (and ``namespace``), oldest first."""
        if namespace is not None:
            where, args = f"{where} AND namespace=?", [*args, namespace]
        with self._lock:
            rows = self._db.execute(f"SELECT {_CHANGE_COLS} FROM history WHERE {where} ORDER BY seq LIMIT ?",
                                    [*args, -1 if limit is None else limit]).fetchall()
        return [self._change(r) for r in rows]

    def audit(self, namespace: str | None = None, since: int = 0, limit: int | None = None) -> builtins.list[Change]:
        return self._changes("seq > ?", [since], namespace, limit)

    def count(self, namespace: str | None = None, status: EditStatus | None = None, *,
              text: str | None = None, subject: str | None = None) -> int:
        where, args = self._where(namespace, status, text, subject)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM edits{where}", args).fetchone()[0])

    def namespaces(self) -> builtins.list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT namespace FROM edits ORDER BY namespace")]

    @staticmethod
    def _change(row: tuple[Any, ...]) -> Change:
        return Change(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]) if row[5] else None, row[6])

    def history(self, edit_id: str, namespace: str | None = None) -> builtins.list[Change]:
        rows = self._changes("edit_id=?", [edit_id], namespace)
        if not rows:
            raise NotFoundError(f"no history for edit {edit_id!r}" + (f" in namespace {namespace!r}" if namespace else ""))
        return rows

    def revision(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM history").fetchone()[0])

    def changes_since(self, revision: int) -> builtins.list[Change]:
        return self._changes("seq > ?", [revision], None)

    def embeddings(self, edit_ids: Sequence[str], embedder: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        ids = list(edit_ids)
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = self._db.execute(
                    f"SELECT edit_id, dim, vectors FROM embeddings WHERE embedder=? AND edit_id IN "
                    f"({','.join('?' * len(chunk))})", [embedder, *chunk]).fetchall()
                for edit_id, dim, blob in rows:
                    out[edit_id] = np.frombuffer(blob, dtype=np.float32).reshape(-1, dim)
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
