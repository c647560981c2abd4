"""The ``/v1/edits`` logic of ``kem serve``, with no web framework in it: create, get, list with paging,
update, delete, history and bulk import over a :class:`~kem.editor.KnowledgeEditor`, each acting for a
:class:`~kem.server.auth.Principal` (a tenant reaches only its own namespace; an admin picks one).

Bodies come in parsed (a JSON value) except for :meth:`Edits.import_edits`, which takes the raw body
and its content type (``{"edits": [...]}``, a JSON list, or JSON lines). Responses go out as JSON-ready
dicts. Store work runs in a worker thread, so the methods are coroutines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from kem.edit import Edit, EditStatus, parse_time
from kem.editor import KnowledgeEditor
from kem.errors import ForbiddenError, ValidationError
from kem.provenance import acting_as
from kem.server.auth import Principal
from kem.server.protocol import BulkResult, EditPage
from kem.stores.rules import check_policy, matches_text

MAX_PAGE = 1000  # edits per listed page
MAX_BULK = 50_000  # edits per import
MAX_OFFSET = 2**62  # SQLite integers are 64-bit
MAX_QUERY = 1000  # characters of a search text
# kem's bookkeeping: set by the store and consolidation, never by a client (a tenant could otherwise
# store an edit as consolidated, or point ``supersedes`` at another tenant's id)
SERVER_OWNED = ("status", "consolidated_in", "supersedes", "superseded_by", "superseded_at", "created_by",
                "created_at", "updated_at")

T = TypeVar("T")


def edit_json(e: Edit) -> dict[str, Any]:
    """An edit as the API returns it."""
    return {"object": "edit", **e.model_dump(mode="json")}


def parse_bulk(raw: bytes, content_type: str = "") -> list[Any]:
    """The rows of an import body: JSON lines when ``content_type`` says ``ndjson`` / ``jsonl``, else
    ``{"edits": [...]}`` or a JSON list. Checks it is a non-empty list of at most :data:`MAX_BULK` rows.

    Raises:
        ValidationError: the body is not valid JSON (lines), not a list, empty, or too long.
    """
    if "ndjson" in content_type or "jsonl" in content_type:
        try:
            rows: Any = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        except ValueError as exc:
            raise ValidationError(f"the body is not valid JSON lines: {exc}", field="body") from None
    else:
        body = parse_json(raw)
        rows = body.get("edits") if isinstance(body, dict) else body
    if not isinstance(rows, list) or not rows:
        raise ValidationError('send {"edits": [Edit, ...]} or JSON lines (one Edit per line)', field="edits")
    if len(rows) > MAX_BULK:
        raise ValidationError(f"at most {MAX_BULK} edits per import (got {len(rows)})", field="edits")
    return rows


def parse_json(raw: bytes) -> Any:
    """A request body as JSON (``None`` when empty)."""
    try:
        return json.loads(raw) if raw else None
    except ValueError as exc:  # UnicodeDecodeError included
        raise ValidationError(f"the request body is not valid JSON: {exc}", field="body") from None
    except RecursionError:
        raise ValidationError("the request body nests too deeply", field="body") from None


def client_fields(caller: Principal, row: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``row`` checked for fields a tenant may not set: kem's bookkeeping (:data:`SERVER_OWNED`) and the
    id (a tenant's chosen id could collide with another tenant's and reveal that it exists). A 400
    names the first one. Admins may set them (restoring a backup, a migration)."""
    if caller.admin:
        return row
    for name in SERVER_OWNED:
        if name in row:
            raise ValidationError(f"{where}{name} is set by kem, not by clients; leave it out",
                                  field=f"{where}{name}")
    if "id" in row:
        raise ValidationError(f"{where}id is chosen by kem for API keys of a tenant; leave it out "
                              "(the response carries it)", field=f"{where}id")
    return row


class Edits:
    """The edits API over ``editor``.

    Every method takes the caller (:class:`Principal`) and the namespace the request names (the
    ``namespace`` query parameter or the ``x-kem-namespace`` header; ``None``: the caller's default).
    """

    def __init__(self, editor: KnowledgeEditor) -> None:
        self.editor = editor

    @staticmethod
    async def _run(fn: Callable[..., T], *args: Any, caller: Principal | None = None, **kw: Any) -> T:
        """``fn`` in a worker thread, its store writes recorded as ``caller`` (:mod:`kem.provenance`)."""
        with acting_as(caller.actor if caller is not None else None):
            return await asyncio.to_thread(fn, *args, **kw)

    async def create(self, caller: Principal, body: Any, namespace: str | None = None,
                     on_conflict: str | None = None) -> dict[str, Any]:
        """Add one edit (``body``: an Edit object; its own ``namespace`` field wins over ``namespace``).
        ``on_conflict`` (query parameter, or the body's ``on_conflict`` field): ``supersede`` (default),
        ``reject`` (409 naming the live edit) or ``keep``. The response lists the superseded ids in
        ``supersedes``."""
        if not isinstance(body, dict):
            raise ValidationError("the body must be one Edit object (subject, prompt, target_new, ...)", field="body")
        body = dict(body)
        policy = check_policy(body.pop("on_conflict", None) or on_conflict or "supersede")
        body = {**client_fields(caller, body), "namespace": caller.namespace_for(body.get("namespace") or namespace)}
        return edit_json(await self._run(self.editor.add, Edit.parse(body), caller=caller, on_conflict=policy,
                                         review=caller.review))

    async def review(self, caller: Principal, edit_id: str, approve: bool, namespace: str | None = None,
                     on_conflict: str | None = None) -> dict[str, Any]:
        """Approve or reject a pending edit (admins only)."""
        if not caller.admin:
            raise ForbiddenError("approving or rejecting edits needs an admin key")
        if approve:
            policy = check_policy(on_conflict or "supersede")
            e = await self._run(self.editor.approve, edit_id, caller.list_scope(namespace), caller=caller,
                                on_conflict=policy)
        else:
            e = await self._run(self.editor.reject, edit_id, caller.list_scope(namespace), caller=caller)
        return edit_json(e)

    async def audit(self, caller: Principal, namespace: str | None = None, *, since: int = 0,
                    limit: int = 100) -> dict[str, Any]:
        """Audit-log rows after ``since`` (a seq), oldest first: an admin's for every namespace unless one
        is named, a tenant's for its own. ``next_since`` continues the listing (None: the end)."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationError(f"limit must be between 1 and {MAX_PAGE} (got {limit})", field="limit")
        if not 0 <= since <= MAX_OFFSET:
            raise ValidationError(f"since must be between 0 and {MAX_OFFSET} (got {since})", field="since")
        rows = await self._run(self.editor.audit, caller.list_scope(namespace), since, limit)
        return {"object": "list", "data": [r.as_dict() for r in rows],
                "next_since": rows[-1].seq if len(rows) == limit else None}

    async def import_edits(self, caller: Principal, raw: bytes, content_type: str = "",
                           namespace: str | None = None, on_conflict: str = "supersede") -> BulkResult:
        """Add many edits in one transaction (all or none); ``raw`` as :func:`parse_bulk` reads it.
        A row's own ``namespace`` wins over ``namespace``. Rows supersede in order (``on_conflict`` as in
        :meth:`create`, for the whole import)."""
        edits = []
        for i, row in enumerate(parse_bulk(raw, content_type)):
            if not isinstance(row, dict):
                raise ValidationError(f"edits[{i}] must be an object", field=f"edits[{i}]")
            try:
                row = {**client_fields(caller, row),
                       "namespace": caller.namespace_for(row.get("namespace") or namespace)}
                edits.append(Edit.parse(row))
            except ValidationError as exc:
                raise ValidationError(f"edits[{i}]: {exc}", field=f"edits[{i}].{exc.field}") from None
        stored = await self._run(self.editor.add_many, edits, caller=caller, on_conflict=check_policy(on_conflict),
                                 review=caller.review)
        return BulkResult(created=len(stored), ids=[e.id for e in stored],
                          superseded=sorted({i for e in stored for i in e.supersedes}))

    async def list(self, caller: Principal, namespace: str | None = None, *, limit: int = 50, offset: int = 0,
                   status: str | None = None, as_of: str | None = None, q: str | None = None,
                   subject: str | None = None) -> EditPage:
        """One page of edits, oldest first; ``next_offset`` is None on the last page. An admin who names
        no namespace sees every namespace. ``as_of`` (ISO 8601): only the edits that applied then.
        ``q``: full-text filter (a substring of the id, subject, prompt, a target or a paraphrase);
        ``subject``: one subject (case-insensitive)."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationError(f"limit must be between 1 and {MAX_PAGE} (got {limit})", field="limit")
        if not 0 <= offset <= MAX_OFFSET:
            raise ValidationError(f"offset must be between 0 and {MAX_OFFSET} (got {offset})", field="offset")
        try:
            st = EditStatus(status) if status else None
        except ValueError:
            raise ValidationError(f"status must be one of {[s.value for s in EditStatus]} (got {status!r})",
                                  field="status") from None
        if q is not None and len(q) > MAX_QUERY:
            raise ValidationError(f"q must be at most {MAX_QUERY} characters (got {len(q)})", field="q")
        q, subject = (q or None), (subject or None)
        ns = caller.list_scope(namespace)
        when = parse_time(as_of, "as_of")
        if when is not None:
            live = [e for e in await self._run(self.editor.as_of, when, ns)
                    if (st is None or e.status == st) and matches_text(e, q, subject)]
            edits, total = live[offset:offset + limit], len(live)
        else:
            edits = await self._run(self.editor.list, ns, st, limit, offset, text=q, subject=subject)
            total = await self._run(self.editor.count, ns, st, text=q, subject=subject)
        nxt = offset + len(edits) if offset + len(edits) < total else None
        return EditPage(data=[edit_json(e) for e in edits], total=total, limit=limit, offset=offset,
                        next_offset=nxt)

    async def search(self, caller: Principal, query: str, namespace: str | None = None, *,
                     k: int = 20) -> dict[str, Any]:
        """The ``k`` edits nearest to ``query`` in one namespace's index (the caller's, or the one an admin
        names), best first, each with its similarity ``score`` and the scope verdict ``in_scope`` that
        serving would reach for this text as a request."""
        if not query or not query.strip():
            raise ValidationError("q must be a non-empty text", field="q")
        if len(query) > MAX_QUERY:
            raise ValidationError(f"q must be at most {MAX_QUERY} characters (got {len(query)})", field="q")
        if not 1 <= k <= 200:
            raise ValidationError(f"k must be between 1 and 200 (got {k})", field="k")
        ns = caller.namespace_for(namespace)
        hits = await self._run(self.editor.retrieve, query, ns, k)
        return {"object": "list", "namespace": ns, "data": [
            {**edit_json(h.edit), "score": round(float(h.score), 4), "in_scope": bool(h.in_scope)} for h in hits]}

    async def import_file(self, caller: Principal, data: bytes, namespace: str | None = None,
                          on_conflict: str = "supersede") -> dict[str, Any]:
        """Import a file in any format ``kem edit import`` reads (CounterFact / ZsRE / MQuAKE JSON, JSON or
        JSON lines of kem edits): the valid records are added in one transaction, the invalid ones are
        skipped and listed (``errors``: record index, field, message), as the CLI does."""
        import tempfile
        from pathlib import Path

        from kem.datasets import read_edits

        policy = check_policy(on_conflict)
        ns = caller.namespace_for(namespace)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "import.jsonl"
            path.write_bytes(data)
            loaded = await asyncio.to_thread(read_edits, path, namespace=ns)
        errors = [e.as_dict() for e in loaded.errors]
        edits = []
        for e in loaded.items:  # a record naming another namespace is refused for a tenant (403) like the API
            row = {k: v for k, v in e.model_dump(mode="json").items() if k not in SERVER_OWNED and k != "id"}
            edits.append(Edit.parse({**row, "namespace": caller.namespace_for(e.namespace)}))
        if len(edits) > MAX_BULK:
            raise ValidationError(f"at most {MAX_BULK} edits per import (got {len(edits)})", field="file")
        stored = await self._run(self.editor.add_many, edits, caller=caller, on_conflict=policy,
                                 review=caller.review) if edits else []
        return {"object": "import", "created": len(stored), "ids": [e.id for e in stored],
                "superseded": sorted({i for e in stored for i in e.supersedes}), "errors": errors}

    async def get(self, caller: Principal, edit_id: str, namespace: str | None = None) -> dict[str, Any]:
        return edit_json(await self._run(self.editor.get, edit_id, caller.list_scope(namespace)))

    async def history(self, caller: Principal, edit_id: str, namespace: str | None = None) -> dict[str, Any]:
        """Every change of the edit, oldest first (deleted edits keep theirs)."""
        changes = await self._run(self.editor.history, edit_id, caller.list_scope(namespace))
        return {"object": "list", "data": [c.__dict__ for c in changes]}

    async def update(self, caller: Principal, edit_id: str, changes: Any,
                     namespace: str | None = None) -> dict[str, Any]:
        """Change some fields of an edit (``changes``: an object of Edit fields; the id is fixed)."""
        if not isinstance(changes, dict) or not changes:
            raise ValidationError("the body must be an object of Edit fields to change", field="body")
        changes = dict(changes)
        if "namespace" in changes:
            changes["namespace"] = caller.namespace_for(changes["namespace"])
        if "id" in changes and changes["id"] != edit_id:
            raise ValidationError("id cannot be changed", field="id")
        if not caller.admin and (caller.review or self.editor.needs_review(caller.namespace)):
            raise ForbiddenError("this key's changes need an admin's review: add a new edit instead (it supersedes "
                                 "this one once approved)")
        return edit_json(await self._run(self.editor.update, edit_id, changes, caller.list_scope(namespace),
                                         caller=caller))

    async def delete(self, caller: Principal, edit_id: str, namespace: str | None = None) -> dict[str, Any]:
        """Delete an edit (it stays in its history)."""
        edit = await self._run(self.editor.remove, edit_id, caller.list_scope(namespace), caller=caller)
        return {"object": "edit.deleted", "id": edit.id, "deleted": True}
