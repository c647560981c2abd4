"""The rules every edit store shares: which fields an update may change, superseding, fact keys,
vector checks. :class:`kem.stores.memory.InMemoryStore` (the reference),
:class:`kem.stores.sqlite.SQLiteStore` (the durable default) and
:class:`kem.stores.postgres.PostgresStore` (shared by replicas) all apply them, and all pass
``tests/store_conformance.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kem.edit import Edit, EditStatus, utcnow
from kem.errors import ValidationError

# Fields a caller may change with update(); the rest is kem's bookkeeping.
UPDATABLE = frozenset(
    {"subject", "prompt", "target_new", "target_true", "relation", "paraphrases", "locality", "source", "status"}
)
LIVE = (EditStatus.active, EditStatus.consolidated)


def statuses(status: EditStatus | str | Sequence[EditStatus | str] | None) -> tuple[EditStatus, ...] | None:
    if status is None:
        return None
    if isinstance(status, str | EditStatus):
        return (EditStatus(status),)
    return tuple(EditStatus(s) for s in status)


def apply_update(edit: Edit, changes: dict[str, Any]) -> Edit:
    """Validate ``changes`` against ``edit`` and return the updated edit (a new object)."""
    bad = sorted(set(changes) - UPDATABLE)
    if bad:
        raise ValidationError(
            f"Edit.{bad[0]} cannot be changed with update (changeable: {', '.join(sorted(UPDATABLE))})",
            field=bad[0],
        )
    if "status" in changes:
        try:
            changes = {**changes, "status": EditStatus(changes["status"])}
        except (ValueError, TypeError):
            raise ValidationError(f"Edit.status must be one of {[s.value for s in EditStatus]} "
                                  f"(got {changes['status']!r})", field="status") from None
    if "status" in changes and changes["status"] == EditStatus.consolidated:
        raise ValidationError("Edit.status cannot be set to 'consolidated' by hand; consolidation does it",
                              field="status")
    data = edit.model_dump()
    data.update(changes)
    data["updated_at"] = utcnow()
    if "status" in changes and EditStatus(changes["status"]) != EditStatus.consolidated:
        data["consolidated_in"] = None
    return Edit.parse(data)


def superseding(new: Edit, old: Edit) -> tuple[Edit, Edit]:
    """Return ``(new', old')`` after ``new`` supersedes ``old``: old retired, new pointing at it."""
    old2 = old.model_copy(update={"status": EditStatus.retired, "updated_at": utcnow()})
    new2 = new.model_copy(update={"supersedes": old.id})
    return new2, old2


def fact_key(e: Edit) -> tuple[str, str, str]:
    """Edits with equal keys state the same relation of the same subject in the same namespace;
    a new one supersedes a live (active or consolidated) old one."""
    return (e.namespace, e.subject_key, e.relation_key)


def check_vectors(edit: Edit, vectors: np.ndarray | None) -> np.ndarray | None:
    if vectors is None:
        return None
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != len(edit.retrieval_keys()):
        raise ValidationError(
            f"embeddings for edit {edit.id} must have one row per retrieval key "
            f"({len(edit.retrieval_keys())}), got shape {arr.shape}", field="embeddings")
    return arr
