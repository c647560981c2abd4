"""Facts over time through the editor (real embedder, SQLite and in-memory stores): supersede however
the relation is phrased, validity windows and "as of" retrieval, review, the audit trail, and an edit
that supersedes a consolidated fact. The store rules themselves are in tests/store_conformance.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kem.edit import EditStatus
from kem.editor import KnowledgeEditor
from kem.errors import ConflictError
from kem.provenance import acting_as
from kem.relations import RelationMatcher, normalise_template, relation_of

NOW = datetime.now(UTC)
DD = "Danielle Darrieux"


def mk(prompt: str, target: str, subject: str = DD, **kw):
    return {"subject": subject, "prompt": prompt, "target_new": target, **kw}


@pytest.fixture(params=["memory", "sqlite"])
def ke(request, kem_settings, embedder, tmp_path):
    if request.param == "memory":
        editor = KnowledgeEditor.in_memory(settings=kem_settings, embedder=embedder)
    else:
        editor = KnowledgeEditor.open(tmp_path / "home", settings=kem_settings, embedder=embedder)
    yield editor
    editor.close()


def answers(ke, query: str, **kw) -> list[str]:
    return [s.edit.target_new for s in ke.retrieve(query, **kw)]


def test_supersede_however_the_relation_is_phrased(ke):
    a = ke.add(mk("The mother tongue of {} is", "English"))
    born = ke.add(mk("{} was born in", "Rome"))
    b = ke.add(mk("{} is a native speaker of", "German"))  # same relation (P103), other words
    assert b.supersedes == [a.id]
    assert ke.get(a.id).status == EditStatus.superseded and ke.get(a.id).superseded_by == b.id
    died = ke.add(mk("{} died in", "Paris"))  # P20 is not P19, although the words are close
    assert died.supersedes == [] and ke.get(born.id).status == EditStatus.active
    c = ke.add(mk("{}'s native language was", "Dutch"))  # not in the vocabulary: normalised / embedding
    assert c.supersedes == [b.id] or relation_of(ke.get(c.id)) is None
    other = ke.add(mk("The mother tongue of {} is", "French", subject="Léon Blum"))
    assert other.supersedes == []  # another subject never
    assert "English" not in answers(ke, "The mother tongue of Danielle Darrieux is")


def test_relation_ids_decide_and_policies(ke):
    a = ke.add(mk("{} speaks", "English", relation="P1412"))
    b = ke.add(mk("{} speaks", "French", relation="P103"))  # same words, other relation id
    assert b.supersedes == [] and ke.get(a.id).status == EditStatus.active
    with pytest.raises(ConflictError, match=b.id):
        ke.add(mk("The mother tongue of {} is", "German"), on_conflict="reject")  # vocabulary: P103
    kept = ke.add(mk("The mother tongue of {} is", "German"), on_conflict="keep")
    assert kept.supersedes == [] and ke.get(b.id).status == EditStatus.active


def test_as_of_windows_and_scheduled_edits(ke):
    q = "The CEO of Kem Corporation is"
    first = ke.add(mk("The CEO of {} is", "Alice Smith", subject="Kem Corporation",
                      valid_from=NOW - timedelta(days=800)))
    second = ke.add(mk("The CEO of {} is", "Bob Jones", subject="Kem Corporation",
                       valid_from=NOW - timedelta(days=100)))
    third = ke.add(mk("The CEO of {} is", "Carol White", subject="Kem Corporation",
                      valid_from=NOW + timedelta(days=30)))  # scheduled: starts by itself
    assert second.supersedes == [first.id] and third.supersedes == [second.id]
    assert answers(ke, q)[:1] == ["Bob Jones"]  # superseded, but its successor has not started yet
    assert answers(ke, q, as_of=NOW - timedelta(days=365))[:1] == ["Alice Smith"]
    assert answers(ke, q, as_of=NOW + timedelta(days=31))[:1] == ["Carol White"]
    assert answers(ke, q, as_of=NOW - timedelta(days=1000)) == []  # before the first one held
    assert [e.id for e in ke.as_of(NOW - timedelta(days=365))] == [first.id]
    promo = ke.add(mk("The price of {} is", "9 euros", subject="Kem Pro", valid_from=NOW - timedelta(days=3),
                      valid_until=NOW - timedelta(days=1)))  # expired: stopped by itself
    assert "9 euros" not in answers(ke, "The price of Kem Pro is")
    assert answers(ke, "The price of Kem Pro is", as_of=NOW - timedelta(days=2))[:1] == ["9 euros"]
    assert ke.get(promo.id).status == EditStatus.active


def test_an_earlier_value_added_later_answers_its_own_time(ke):
    now_ceo = ke.add(mk("The CEO of {} is", "Bob Jones", subject="Kem Corporation", valid_from=NOW - timedelta(days=100)))
    old_ceo = ke.add(mk("Who is the CEO of {}?", "Alice Smith", subject="Kem Corporation", relation=None,
                        valid_from=NOW - timedelta(days=800)))
    if old_ceo.status == EditStatus.superseded:  # matched as the same relation: an earlier value
        assert old_ceo.superseded_by == now_ceo.id
        assert answers(ke, "The CEO of Kem Corporation is")[:1] == ["Bob Jones"]
        assert "Alice Smith" in answers(ke, "The CEO of Kem Corporation is", as_of=NOW - timedelta(days=365))
    else:  # a question template the vocabulary does not know: both live (documented), never lost
        assert old_ceo.status == EditStatus.active


def test_review_keeps_pending_edits_out_of_prompts(ke):
    live = ke.add(mk("The mother tongue of {} is", "English"))
    pending = ke.add(mk("The mother tongue of {} is", "German"), review=True)
    assert pending.status == EditStatus.pending and ke.get(live.id).status == EditStatus.active
    assert answers(ke, "The mother tongue of Danielle Darrieux is")[:1] == ["English"]
    with acting_as("admin:test"):
        approved = ke.approve(pending.id)
    assert approved.supersedes == [live.id]
    assert answers(ke, "The mother tongue of Danielle Darrieux is")[:1] == ["German"]
    rows = ke.audit()
    assert ("approve", "admin:test") in [(r.op, r.actor) for r in rows]
    assert ("supersede", "admin:test") in [(r.op, r.actor) for r in rows]


def test_review_namespaces_setting(kem_settings, embedder):
    s = kem_settings.model_copy(update={"review_namespaces": "acme, other"})
    with KnowledgeEditor.in_memory(settings=s, embedder=embedder) as ke:
        assert ke.add(mk("{} is", "X", namespace="acme")).status == EditStatus.pending
        assert ke.add(mk("{} is", "X", namespace="default")).status == EditStatus.active
        rejected = ke.reject(ke.list("acme")[0].id)
        assert rejected.status == EditStatus.rejected and ke.retrieve("Danielle Darrieux is", "acme") == []


def test_a_fact_changed_twice_keeps_who_and_when(ke):
    with acting_as("key:abc@default"):
        ids = [ke.add(mk("The CEO of {} is", who, subject="Kem Corporation")).id
               for who in ("Alice Smith", "Bob Jones", "Carol White")]
    hist = ke.history(ids[0])
    assert [h.op for h in hist] == ["add", "supersede"] and all(h.actor == "key:abc@default" for h in hist)
    assert hist[1].snapshot["superseded_by"] == ids[1]
    assert ke.get(ids[0]).created_by == "key:abc@default"
    assert [e.status for e in map(ke.get, ids)] == [EditStatus.superseded, EditStatus.superseded, EditStatus.active]


def test_superseding_a_consolidated_fact_answers_on_the_fast_path(ke):
    old = ke.add(mk("The mother tongue of {} is", "English"))
    ke.store.mark_consolidated([old.id], "v1")
    ke.serve_version({"v1"})  # the weights hold "English": the fast path skips the old edit
    assert answers(ke, "The mother tongue of Danielle Darrieux is") == [] or \
        "English" not in answers(ke, "The mother tongue of Danielle Darrieux is")
    new = ke.add(mk("{} is a native speaker of", "German"))
    assert new.supersedes == [old.id] and ke.get(old.id).status == EditStatus.superseded
    assert answers(ke, "The mother tongue of Danielle Darrieux is")[:1] == ["German"]  # over v1's weights
    assert [e.id for e in ke.list(status=EditStatus.active)] == [new.id]  # what the next job consolidates


def test_template_normalisation_and_matcher(embedder):
    assert normalise_template("The mother tongue of {} was:") == "the mother tongue of {} is"
    m = RelationMatcher(embedder, threshold=0.9)
    assert m.similarity("The mother tongue of {} is", "The mother tongue of {} is") == pytest.approx(1.0, abs=1e-5)
    assert m.similarity("{} was born in", "The capital of {} is") < 0.9


def test_consolidation_takes_the_latest_fact_and_no_windowed_one(ke):
    from kem.consolidation.job import pending_edits

    old = ke.add(mk("The mother tongue of {} is", "English"))
    ke.store.mark_consolidated([old.id], "v1")
    new = ke.add(mk("{} is a native speaker of", "German"))  # supersedes the consolidated fact
    ke.add(mk("The price of {} is", "9 euros", subject="Kem Pro", valid_until=NOW + timedelta(days=7)))
    ke.add(mk("The CEO of {} is", "Carol", subject="Kem Corporation", valid_from=NOW + timedelta(days=30)))
    ke.add(mk("The CEO of {} is", "Dan", subject="Kem Inc", valid_from=NOW - timedelta(days=30)))
    ke.add(mk("{} was born in", "Rome"), review=True)
    todo = [e.target_new for e in pending_edits(ke.store, frozenset({"v1"}))]
    assert todo == ["German", "Dan"] and new.supersedes == [old.id]
