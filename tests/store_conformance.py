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
        assert new.supersedes == [old.id]
        assert store.get(old.id).status == EditStatus.superseded and store.get(old.id).superseded_by == new.id
        assert [e.id for e in store.list(status=EditStatus.active)] == [new.id]
        assert [c.op for c in store.history(old.id)] == ["add", "supersede"]
        other_rel = store.add(mk(prompt="{} was born in", target="Rome"))
        assert other_rel.supersedes == [] and store.get(new.id).status == EditStatus.active

    def test_supersede_is_per_namespace(self, store):
        a = store.add(mk(ns="alice"))
        b = store.add(mk(ns="bob", target="German"))
        assert b.supersedes == [] and store.get(a.id).status == EditStatus.active

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

    # ---- facts over time: supersede policies, matches, windows, review, audit --------------------------
    def test_superseded_edit_keeps_its_window_and_successor(self, store):
        from datetime import UTC, datetime

        old = store.add(mk(target="English"))
        new = store.add(mk(target="German"))
        old2 = store.get(old.id)
        assert old2.superseded_at == new.valid_from and new.valid_from is not None
        assert old2.applies_at(datetime(2000, 1, 1, tzinfo=UTC)) and not old2.applies_at(new.valid_from)
        assert new.applies_at(new.valid_from) and not new.applies_at(datetime(2000, 1, 1, tzinfo=UTC))
        assert [e.id for e in store.list(status="superseded")] == [old.id]

    def test_reject_policy_names_the_live_edit_and_writes_nothing(self, store):
        old = store.add(mk(target="English"))
        rev = store.revision()
        with pytest.raises(ConflictError, match=old.id):
            store.add_many([mk("Other"), mk(target="German")], on_conflict="reject")
        assert store.revision() == rev and store.count() == 1 and store.get(old.id).status == EditStatus.active
        with pytest.raises(ValidationError, match="on_conflict"):
            store.add_many([mk(target="German")], on_conflict="overwrite")

    def test_keep_policy_leaves_both_live(self, store):
        a = store.add(mk(prompt="{} is a twin city of", subject="Lyon", target="Beirut"))
        b = store.add_many([mk(prompt="{} is a twin city of", subject="Lyon", target="Frankfurt")],
                           on_conflict="keep")[0]
        assert b.supersedes == [] and {e.id for e in store.list(status="active")} == {a.id, b.id}

    def test_matches_supersede_another_template_but_never_across_namespace_or_subject(self, store):
        a = store.add(mk(prompt="The mother tongue of {} is", target="English"))
        other_ns = store.add(mk(prompt="The mother tongue of {} is", target="French", ns="bob"))
        other_subject = store.add(mk("Léon Blum", target="French"))
        new = store.add_many([mk(prompt="{} is a native speaker of", target="German")],
                             matches=None)[0]
        assert new.supersedes == []  # another template and no match: both live
        newer = store.add_many([mk(prompt="{}, a native", target="Dutch", id="n3")],
                               matches={"n3": [a.id, new.id, other_ns.id, other_subject.id]})[0]
        assert sorted(newer.supersedes) == sorted([a.id, new.id])
        assert store.get(other_ns.id).status == EditStatus.active
        assert store.get(other_subject.id).status == EditStatus.active

    def test_a_batch_supersedes_in_order(self, store):
        edits = store.add_many([mk(target=t) for t in ("A", "B", "C")])
        assert edits[1].supersedes == [edits[0].id] and edits[2].supersedes == [edits[1].id]
        assert [store.get(e.id).status for e in edits] == [EditStatus.superseded, EditStatus.superseded,
                                                             EditStatus.active]
        assert store.get(edits[0].id).superseded_by == edits[1].id

    def test_an_earlier_value_is_stored_superseded_by_the_live_one(self, store):
        from datetime import UTC, datetime

        live = store.add(mk(target="B", valid_from=datetime(2024, 1, 1, tzinfo=UTC)))
        past = store.add(mk(target="A", valid_from=datetime(2020, 1, 1, tzinfo=UTC)))
        assert past.status == EditStatus.superseded and past.superseded_by == live.id
        assert past.superseded_at == live.valid_from and store.get(live.id).status == EditStatus.active
        assert past.applies_at(datetime(2022, 1, 1, tzinfo=UTC)) and not past.applies_at(datetime(2025, 1, 1, tzinfo=UTC))

    def test_review_approve_supersedes_then_and_reject_never_applies(self, store):
        live = store.add(mk(target="English"))
        pend = store.add(mk(target="German", status="pending"))
        assert store.get(live.id).status == EditStatus.active and pend.supersedes == []
        approved = store.review(pend.id, True)
        assert approved.status == EditStatus.active and approved.supersedes == [live.id]
        assert store.get(live.id).status == EditStatus.superseded
        with pytest.raises(ConflictError, match="not pending"):
            store.review(pend.id, False)
        other = store.add(mk(target="Dutch", status="pending", ns="bob"))
        with pytest.raises(NotFoundError):
            store.review(other.id, True, "alice")
        rejected = store.review(other.id, False, "bob")
        assert rejected.status == EditStatus.rejected and not rejected.applies_at(rejected.created_at)
        assert [c.op for c in store.history(pend.id)] == ["add", "approve"]

    def test_audit_rows_name_the_actor_and_stay_in_their_namespace(self, store):
        from kem.provenance import acting_as

        with acting_as("key:alice"):
            a = store.add(mk(ns="alice"))
            store.add(mk(ns="alice", target="German"))
        with acting_as("key:bob"):
            store.add(mk(ns="bob"))
        assert a.created_by == "key:alice"
        rows = store.audit("alice")
        assert [(r.op, r.actor) for r in rows] == [("add", "key:alice"), ("supersede", "key:alice"),
                                                  ("add", "key:alice")]
        assert all(r.namespace == "alice" for r in rows)
        assert [r.namespace for r in store.audit()] == ["alice", "alice", "alice", "bob"]
        assert len(store.audit(since=rows[0].seq, limit=2)) == 2

    def test_live_for_subjects(self, store):
        a = store.add(mk())
        store.add(mk(ns="bob"))
        store.add(mk("Léon Blum"))
        assert [e.id for e in store.live_for_subjects([("default", "danielle darrieux")])] == [a.id]

    def test_windows_are_validated(self, store):
        from datetime import UTC, datetime

        bad = {"subject": "S", "prompt": "{} is", "target_new": "T", "valid_from": "2025-01-01",
               "valid_until": datetime(2024, 1, 1, tzinfo=UTC)}
        with pytest.raises(ValidationError, match="valid_until"):
            store.add(bad)
        assert store.count() == 0
        with pytest.raises(ValidationError, match="status"):
            a = store.add(mk())
            store.update(a.id, {"status": "superseded"})

    def test_text_and_subject_filters_page_and_count(self, store):
        """The console's search: ``text`` is a case-insensitive substring of the id, subject, prompt, a target
        or a paraphrase; ``subject`` one subject; LIKE's wildcards are matched as characters."""
        made = store.add_many([mk(f"Widget {i}", f"Maker {i}") for i in range(12)]
                              + [mk("Gadget", "100% cotton", paraphrases=["Who made the Gadget_x?"]),
                                 mk("Widget 3", "Other", ns="other")])
        assert [e.subject for e in store.list("default", text="widget 1")] == ["Widget 1", "Widget 10", "Widget 11"]
        assert store.count("default", text="WIDGET 1") == 3 and store.count(None, text="widget 3") == 2
        page = store.list("default", text="widget", limit=5, offset=10)
        assert [e.subject for e in page] == ["Widget 10", "Widget 11"] and store.count("default", text="widget") == 12
        assert [e.subject for e in store.list(text="maker 7")] == ["Widget 7"]  # a target
        assert [e.subject for e in store.list(text="gadget_x")] == ["Gadget"]  # a paraphrase
        assert store.list(text="gadget%x") == [] and store.list(text="_") != []  # wildcards are characters
        assert [e.target_new for e in store.list(text="100%")] == ["100% cotton"]
        assert [e.id for e in store.list(text=made[5].id[:12])] == [made[5].id]
        assert [e.namespace for e in store.list(subject="widget 3")] == ["default", "other"]
        assert store.count("other", subject="WIDGET 3") == 1 and store.list("default", subject="Widget") == []
        assert store.count("default", "active", text="widget", subject="widget 2") == 1
        assert store.count("default", "retired", text="widget") == 0
