"""The rules every edit store shares: which fields an update may change, superseding, fact keys,
vector checks. :class:`kem.stores.in_memory.InMemoryStore` (the reference),
:class:`kem.stores.sqlite.SQLiteStore` (the durable default) and
:class:`kem.stores.postgres.PostgresStore` (shared by replicas) all apply them, and all pass
``tests/store_conformance.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np

from kem.edit import Edit, EditStatus, utcnow
from kem.errors import ConflictError, ValidationError
from kem.provenance import current_actor

# Fields a caller may change with update(); the rest is kem's bookkeeping.
UPDATABLE = frozenset(
    {"subject", "prompt", "target_new", "target_true", "relation", "paraphrases", "locality", "source", "status",
     "evidence", "valid_from", "valid_until"}
)
LIVE = (EditStatus.active, EditStatus.consolidated)
# Edits that apply at some time (inside their window): what the index holds. Superseded ones answer
# "as of" requests from before their successor took over.
HELD = (EditStatus.active, EditStatus.consolidated, EditStatus.superseded)
# Statuses update() may set; the others are reached through add (supersede), review and consolidation.
SETTABLE = (EditStatus.active, EditStatus.retired)

Policy = Literal["supersede", "reject", "keep"]
POLICIES: tuple[str, ...] = ("supersede", "reject", "keep")
Matches = Mapping[str, Sequence[str]]  # new edit id -> ids of live edits kem found to state the same fact


def check_policy(policy: str) -> Policy:
    if policy not in POLICIES:
        raise ValidationError(f"on_conflict must be one of {', '.join(POLICIES)} (got {policy!r})",
                              field="on_conflict")
    return policy  # type: ignore[return-value]


def statuses(status: EditStatus | str | Sequence[EditStatus | str] | None) -> tuple[EditStatus, ...] | None:
    if status is None:
        return None
    if isinstance(status, str | EditStatus):
        return (EditStatus(status),)
    return tuple(EditStatus(s) for s in status)


def search_text(e: Edit) -> str:
    """What the stores' ``text`` filter looks in: the id, subject, prompt, targets and paraphrases, one
    per line, case-folded (SQLite keeps it in the ``search`` column; PostgreSQL computes the same with
    ``lower()``)."""
    return "\n".join([e.id, e.subject, e.prompt, e.target_new, e.target_true or "", *e.paraphrases]).casefold()


def matches_text(e: Edit, text: str | None, subject: str | None = None) -> bool:
    """The in-memory form of the stores' ``text`` / ``subject`` filters: ``text`` is a case-insensitive
    substring of the edit's id, subject, prompt, targets or a paraphrase; ``subject`` equals the
    subject (case-insensitive)."""
    if subject is not None and e.subject_key != subject.casefold():
        return False
    return not text or text.casefold() in search_text(e)


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
    if "status" in changes and changes["status"] not in SETTABLE and changes["status"] != edit.status:
        raise ValidationError(
            f"Edit.status cannot be set to {changes['status'].value!r} with update: a newer edit of the same fact "
            "supersedes (add it), review approves or rejects (approve/reject)", field="status")
    data = edit.model_dump()
    data.update(changes)
    data["updated_at"] = utcnow()
    if "status" in changes and EditStatus(changes["status"]) != EditStatus.consolidated:
        data["consolidated_in"] = None
    return Edit.parse(data)


def stamp(edit: Edit) -> Edit:
    """``edit`` with its author recorded (``created_by``: the current actor, unless it says already)."""
    return edit if edit.created_by else edit.model_copy(update={"created_by": current_actor()})


def same_fact(new: Edit, found: Iterable[Edit]) -> list[Edit]:
    """The live edits among ``found`` that ``new`` may supersede: live, of the same namespace and
    subject, not ``new`` itself, each once. Matches a caller computed (by template or embedding) pass
    through here too, so a match can never reach into another namespace or another subject."""
    out: dict[str, Edit] = {}
    for e in found:
        if e.id != new.id and e.status in LIVE and e.namespace == new.namespace and e.subject_key == new.subject_key:
            out.setdefault(e.id, e)
    return list(out.values())


def resolve(new: Edit, live: Sequence[Edit], policy: Policy, now: datetime | None = None) -> tuple[Edit, list[Edit]]:
    """Apply ``policy`` to ``new`` against the ``live`` edits stating the same fact (see :func:`same_fact`).

    Returns ``(new', changed)``: the edit to store and the old edits to write back.
    - ``supersede``: each old edit becomes ``superseded`` (``superseded_by`` = new, ``superseded_at`` =
      when the new one starts: its ``valid_from``, else now, which then becomes its ``valid_from``), and
      ``new.supersedes`` lists them. A new edit whose ``valid_from`` is before a live edit's ``valid_from``
      states an earlier value: it is stored ``superseded`` by that edit, ending where it starts.
    - ``reject``: :class:`ConflictError` naming the live edit.
    - ``keep``: both stay live (multi-valued relations).
    """
    if not live or policy == "keep" or new.status not in LIVE:
        return new, []
    if policy == "reject":
        ids = ", ".join(e.id for e in live)
        raise ConflictError(f"edit {new.id!r} states the same fact as live edit(s) {ids} (subject "
                            f"{new.subject!r}); supersede it, or add with on_conflict 'supersede' or 'keep'")
    now = now or utcnow()
    for old in live:
        if new.valid_from is not None and old.valid_from is not None and new.valid_from < old.valid_from:
            return new.model_copy(update={"status": EditStatus.superseded, "superseded_by": old.id,
                                          "superseded_at": old.valid_from}), []
    start = new.valid_from or now
    changed = [old.model_copy(update={"status": EditStatus.superseded, "superseded_by": new.id,
                                      "superseded_at": start, "updated_at": now}) for old in live]
    new2 = new.model_copy(update={"supersedes": [*new.supersedes, *(o.id for o in live if o.id not in new.supersedes)],
                                  "valid_from": start})
    return new2, changed


def review_transition(edit: Edit, approve: bool) -> Edit:
    """A pending edit approved (``active``; the store then resolves it like a new add) or rejected."""
    if edit.status != EditStatus.pending:
        raise ConflictError(f"edit {edit.id!r} is {edit.status.value}, not pending: only pending edits are "
                            "approved or rejected")
    return edit.model_copy(update={"status": EditStatus.active if approve else EditStatus.rejected,
                                   "updated_at": utcnow()})


def hinted(matches: Matches | None, edit_id: str) -> list[str]:
    return list((matches or {}).get(edit_id, ()))


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
