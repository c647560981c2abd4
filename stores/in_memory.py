"""The in-memory reference edit store (``kem.stores.in_memory``).

:class:`InMemoryStore` is the reference implementation of :class:`kem.protocols.EditStore`: plain
dicts, no persistence, for tests and ephemeral use. :class:`kem.stores.sqlite.SQLiteStore` is the
durable default. Both apply the rules of :mod:`kem.stores.rules` and pass ``tests/store_conformance.py``.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from kem.edit import Edit, EditStatus, utcnow
from kem.errors import ConflictError, NotFoundError, ValidationError
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
    matches_text,
    resolve,
    review_transition,
    same_fact,
    stamp,
    statuses,
)
from kem.stores.services import LocalStore


class InMemoryStore(LocalStore):
    """Reference :class:`~kem.protocols.EditStore` kept in dicts (lost when the process ends)."""

    def __init__(self) -> None:
        self._edits: dict[str, Edit] = {}
        self._order: list[str] = []
        self._history: list[Change] = []
        self._vectors: dict[tuple[str, str], np.ndarray] = {}
        self._by_subject: dict[tuple[str, str], list[str]] = {}  # (namespace, subject key) -> edit ids
        self._lock = threading.RLock()

    # -- helpers
    def _log(self, edit: Edit, op: str) -> None:
        self._history.append(
            Change(len(self._history) + 1, edit.id, edit.namespace, op, utcnow().isoformat(),
                   edit.model_dump(mode="json"), current_actor())
        )

    def _get(self, edit_id: str, namespace: str | None) -> Edit:
        e = self._edits.get(edit_id)
        if e is None or (namespace is not None and e.namespace != namespace):
            raise NotFoundError(f"no edit with id {edit_id!r}" + (f" in namespace {namespace!r}" if namespace else ""))
        return e

    def _rekey(self, old: Edit, new: Edit | None) -> None:
        ids = self._by_subject.get((old.namespace, old.subject_key), [])
        if old.id in ids:
            ids.remove(old.id)
        if new is not None:
            self._by_subject.setdefault((new.namespace, new.subject_key), []).append(new.id)

    def _live_of(self, namespace: str, subject_key: str) -> list[Edit]:
        return [e for i in self._by_subject.get((namespace, subject_key), []) if (e := self._edits[i]).status in LIVE]

    def _place(self, e: Edit, policy: Any, matches: list[str]) -> Edit:
        """Resolve ``e`` against the live edits of the same fact (exact key or matched) and write the
        old ones back; returns ``e`` as it is to be stored."""
        live = self._live_of(e.namespace, e.subject_key)
        found = [o for o in live if fact_key(o) == fact_key(e)] + [o for o in live if o.id in matches]
        e, changed = resolve(e, same_fact(e, found), policy)
        for old in changed:
            self._edits[old.id] = old
            self._log(old, "supersede")
        return e

    # -- writes
    def add(self, edit: Edit, embeddings: np.ndarray | None = None, embedder: str | None = None) -> Edit:
        return self.add_many([edit], None if embeddings is None else [embeddings], embedder)[0]

    def add_many(self, edits: Sequence[Edit], embeddings: Sequence[np.ndarray] | None = None,
                 embedder: str | None = None, *, on_conflict: str = "supersede",
                 matches: Matches | None = None) -> list[Edit]:
        policy = check_policy(on_conflict)
        edits = [stamp(Edit.parse(e)) for e in edits]
        vecs = [check_vectors(e, v) for e, v in zip(edits, embeddings or [None] * len(edits), strict=True)]  # type: ignore[list-item]
        if embeddings is not None and not embedder:
            raise ValidationError("embedder must be named when embeddings are given", field="embedder")
        with self._lock:
            ids = [e.id for e in edits]
            dup = next((i for i in ids if i in self._edits), None) or next(
                (i for n, i in enumerate(ids) if i in ids[:n]), None)
            if dup:
                raise ConflictError(f"an edit with id {dup!r} already exists")
            snapshot = (dict(self._edits), list(self._order), list(self._history),
                        {k: list(v) for k, v in self._by_subject.items()})
            out = []
            try:
                for e, v in zip(edits, vecs, strict=True):
                    e = self._place(e, policy, hinted(matches, e.id))
                    self._insert(e, v, embedder)
                    out.append(e)
            except BaseException:  # all or nothing
                self._edits, self._order, self._history, self._by_subject = snapshot
                for e in out:
                    for key in [k for k in self._vectors if k[0] == e.id]:
                        del self._vectors[key]
                raise
            return out

    def _insert(self, e: Edit, v: np.ndarray | None, embedder: str | None) -> None:
        self._edits[e.id] = e
        self._order.append(e.id)
        self._by_subject.setdefault((e.namespace, e.subject_key), []).append(e.id)
        if v is not None and embedder:
            self._vectors[(e.id, embedder)] = v
        self._log(e, "add")

    def update(self, edit_id: str, changes: dict[str, Any], namespace: str | None = None) -> Edit:
        with self._lock:
            old = self._get(edit_id, namespace)
            new = apply_update(old, changes)
            self._edits[edit_id] = new
            self._rekey(old, new)
            for key in [k for k in self._vectors if k[0] == edit_id]:
                del self._vectors[key]  # text may have changed: re-embed
            self._log(new, "update")
            return new

    def delete(self, edit_id: str, namespace: str | None = None) -> Edit:
        with self._lock:
            e = self._get(edit_id, namespace)
            self._rekey(e, None)
            del self._edits[edit_id]
            self._order.remove(edit_id)
            for key in [k for k in self._vectors if k[0] == edit_id]:
                del self._vectors[key]
            self._log(e, "delete")
            return e

    def review(self, edit_id: str, approve: bool, namespace: str | None = None, *,
               matches: Sequence[str] = (), on_conflict: str = "supersede") -> Edit:
        policy = check_policy(on_conflict)
        with self._lock:
            e = self._get(edit_id, namespace)
            e = review_transition(e, approve)
            if approve:
                e = self._place(e, policy, list(matches))
            self._edits[e.id] = e
            self._log(e, "approve" if approve else "reject")
            return e

    def mark_consolidated(self, edit_ids: Sequence[str], version: str) -> None:
        with self._lock:
            for i in edit_ids:
                self._get(i, None)
            for i in edit_ids:
                e = self._edits[i].model_copy(update={"status": EditStatus.consolidated, "consolidated_in": version,
                                                      "updated_at": utcnow()})
                self._edits[i] = e
                self._log(e, "consolidate")

    def put_embeddings(self, edit_id: str, embedder: str, vectors: np.ndarray) -> None:
        with self._lock:
            self._vectors[(edit_id, embedder)] = check_vectors(self._get(edit_id, None), vectors)  # type: ignore[assignment]

    # -- reads
    def get(self, edit_id: str, namespace: str | None = None) -> Edit:
        with self._lock:
            return self._get(edit_id, namespace)

    def list(self, namespace: str | None = None, status: Any = None, limit: int | None = None,
             offset: int = 0, *, text: str | None = None, subject: str | None = None) -> list[Edit]:
        want = statuses(status)
        with self._lock:
            rows = [self._edits[i] for i in self._order]
        rows = [e for e in rows if (namespace is None or e.namespace == namespace) and (want is None or e.status in want)
                and matches_text(e, text, subject)]
        return rows[offset: None if limit is None else offset + limit]

    def live_for_subjects(self, keys: Sequence[tuple[str, str]]) -> builtins.list[Edit]:
        with self._lock:
            return [e for ns, subj in dict.fromkeys(keys) for e in self._live_of(ns, subj)]

    def audit(self, namespace: str | None = None, since: int = 0, limit: int | None = None) -> builtins.list[Change]:
        with self._lock:
            rows = [c for c in self._history[since:] if namespace is None or c.namespace == namespace]
        return rows if limit is None else rows[:limit]

    def count(self, namespace: str | None = None, status: EditStatus | None = None, *,
              text: str | None = None, subject: str | None = None) -> int:
        return len(self.list(namespace, status, text=text, subject=subject))

    def namespaces(self) -> builtins.list[str]:
        with self._lock:
            return sorted({e.namespace for e in self._edits.values()})

    def history(self, edit_id: str, namespace: str | None = None) -> builtins.list[Change]:
        with self._lock:
            rows = [c for c in self._history if c.edit_id == edit_id and (namespace is None or c.namespace == namespace)]
        if not rows:
            raise NotFoundError(f"no history for edit {edit_id!r}" + (f" in namespace {namespace!r}" if namespace else ""))
        return rows

    def revision(self) -> int:
        return len(self._history)

    def changes_since(self, revision: int) -> builtins.list[Change]:
        with self._lock:
            return self._history[revision:]

    def embeddings(self, edit_ids: Sequence[str], embedder: str) -> dict[str, np.ndarray]:
        with self._lock:
            return {i: self._vectors[(i, embedder)] for i in edit_ids if (i, embedder) in self._vectors}

    def close(self) -> None:
        pass
