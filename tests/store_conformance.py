"""The conformance suite every EditStore passes (langchain standard-tests style).

Subclass :class:`StoreConformance` and define a ``store`` fixture returning a fresh, empty store.
"""

from __future__ import annotations

import numpy as np
import pytest

from kem.edit import Edit, EditStatus
from kem.errors import ConflictError, NotFoundError, ValidationError


def mk(subject: str = "Danielle Darrieux", target: str = "English", ns: str = "default", **kw) -> Edit:
    return Edit(subject=subject, prompt=kw.pop("prompt", "The mother tongue of {} is"), target_new=target,
                namespace=ns, **kw)


class StoreConformance:
    def test_add_get_list_count(self, store):
        a = store.add(mk())
        b = store.add(mk("Léon Blum", "German"))
        assert store.get(a.id) == a
        assert [e.id for e in store.list()] == [a.id, b.id]
        assert store.count() == 2 and store.count(status=EditStatus.active) == 2
        assert store.list(limit=1, offset=1)[0].id == b.id

    def test_duplicate_id_conflicts_and_changes_nothing(self, store):
        a = store.add(mk())
        rev = store.revision()
        with pytest.raises(ConflictError):
            store.add(mk("Other", id=a.id))
        assert store.revision() == rev and store.count() == 1

    def test_add_many_is_all_or_nothing(self, store):
        a = store.add(mk())
        with pytest.raises(ConflictError):
            store.add_many([mk("X"), mk("Y", id=a.id)])
        assert [e.id for e in store.list()] == [a.id]

    def test_supersede_same_subject_and_relation(self, store):
        old = store.add(mk(target="English"))
        new = store.add(mk(target="German"))
        assert new.supersedes == old.id
        assert store.get(old.id).status == EditStatus.retired
        assert [e.id for e in store.list(status=EditStatus.active)] == [new.id]
        assert [c.op for c in store.history(old.id)] == ["add", "supersede"]
        other_rel = store.add(mk(prompt="{} was born in", target="Rome"))
        assert other_rel.supersedes is None and store.get(new.id).status == EditStatus.active

    def test_supersede_is_per_namespace(self, store):
        a = store.add(mk(ns="alice"))
        b = store.add(mk(ns="bob", target="German"))
        assert b.supersedes is None and store.get(a.id).status == EditStatus.active

    def test_namespace_isolation(self, store):
        a = store.add(mk(ns="alice"))
        store.add(mk(ns="bob"))
        assert [e.namespace for e in store.list("alice")] == ["alice"]
        with pytest.raises(NotFoundError):
            store.get(a.id, "bob")
        with pytest.raises(NotFoundError):
            store.delete(a.id, "bob")
        with pytest.raises(NotFoundError):
            store.update(a.id, {"target_new": "Hacked"}, "bob")
        assert store.get(a.id).target_new == "English"
        assert store.namespaces() == ["alice", "bob"]

    def test_update_validates_and_keeps_history(self, store):
        a = store.add(mk())
        u = store.update(a.id, {"target_new": "  Spanish "})
        assert u.target_new == "Spanish" and store.get(a.id).target_new == "Spanish"
        with pytest.raises(ValidationError, match="prompt"):
            store.update(a.id, {"prompt": "no placeholder here"})
        with pytest.raises(ValidationError, match="namespace"):
            store.update(a.id, {"namespace": "evil"})
        assert store.get(a.id).target_new == "Spanish"
        assert [c.op for c in store.history(a.id)] == ["add", "update"]
        assert store.history(a.id)[0].snapshot["target_new"] == "English"

    def test_delete_keeps_history(self, store):
        a = store.add(mk())
        store.delete(a.id)
        with pytest.raises(NotFoundError):
            store.get(a.id)
        assert store.count() == 0
        h = store.history(a.id)
        assert [c.op for c in h] == ["add", "delete"] and h[-1].snapshot["target_new"] == "English"
        with pytest.raises(NotFoundError):
            store.delete(a.id)

    def test_revision_and_changes_since(self, store):
        r0 = store.revision()
        a = store.add(mk())
        store.update(a.id, {"target_new": "Dutch"})
        store.delete(a.id)
        ops = [(c.op, c.edit_id) for c in store.changes_since(r0)]
        assert ops == [("add", a.id), ("update", a.id), ("delete", a.id)]
        assert store.revision() == r0 + 3 and store.changes_since(store.revision()) == []

    def test_mark_consolidated(self, store):
        a = store.add(mk())
        store.mark_consolidated([a.id], "v1")
        got = store.get(a.id)
        assert got.status == EditStatus.consolidated and got.consolidated_in == "v1"
        with pytest.raises(NotFoundError):
            store.mark_consolidated([a.id, "missing"], "v2")
        assert store.get(a.id).consolidated_in == "v1"
        with pytest.raises(ValidationError):
            store.update(a.id, {"status": "consolidated"})

    def test_embeddings_round_trip_and_dropped_on_text_change(self, store):
        e = mk(paraphrases=["Where Danielle Darrieux is from, people speak"])
        vec = np.random.default_rng(0).standard_normal((len(e.retrieval_keys()), 8)).astype(np.float32)
        store.add(e, vec, "emb")
        np.testing.assert_array_equal(store.embeddings([e.id], "emb")[e.id], vec)
        assert store.embeddings([e.id], "other") == {}
        with pytest.raises(ValidationError, match="embeddings"):
            store.put_embeddings(e.id, "emb", vec[:1])
        store.update(e.id, {"subject": "Someone Else"})
        assert store.embeddings([e.id], "emb") == {}

    def test_unknown_ids(self, store):
        for call in (lambda: store.get("nope"), lambda: store.history("nope"), lambda: store.delete("nope"),
                     lambda: store.update("nope", {"target_new": "x"})):
            with pytest.raises(NotFoundError):
                call()
