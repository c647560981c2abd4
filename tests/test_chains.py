"""Chains of edits in the fast path (multi-hop): the walk itself on plain edits, then through the
editor with the real embedder (order, namespaces, requests without a chain left unchanged)."""

from __future__ import annotations

import pytest

from kem.chains import WordSimilarity, follow, relation_words, stem, stems
from kem.edit import Edit
from kem.editor import KnowledgeEditor

Q = 'What is the official language of the country of citizenship of the director of "Hey Jude"\'s performer?'
HOPS = [("Hey Jude", "{} was performed by", "Madonna"), ("Madonna", "The director of {} is", "Narendra Modi"),
        ("Narendra Modi", "{} is a citizen of", "Australia"), ("Australia", "The official language of {} is", "Arabic")]


def mk(subject: str, prompt: str, target: str, ns: str = "default") -> Edit:
    return Edit(subject=subject, prompt=prompt, target_new=target, namespace=ns)


def lookup(edits: list[Edit]):
    return lambda key: [e for e in edits if e.subject_key == key]


def test_the_walk_follows_objects_to_subjects_whose_relation_is_asked():
    edits = [mk(*h) for h in HOPS]
    extra = [mk("Madonna", "{} was born in", "Rome"), mk("Australia", "The capital of {} is", "Perth")]
    start, hops = follow(Q, [edits[0]], lookup(edits + extra))
    assert start.id == edits[0].id and [e.target_new for e in hops] == ["Narendra Modi", "Australia", "Arabic"]
    assert follow(Q, [edits[0]], lookup(edits), max_depth=1)[1] == [edits[1]]
    # a relation the request does not name is not followed; nothing to follow: None
    assert follow("Who performed Hey Jude?", [edits[0]], lookup(edits + extra)) is None
    assert follow(Q, [edits[3]], lookup(edits)) is None
    # a cycle ends
    loop = [mk("A", "The director of {} is", "B"), mk("B", "The director of {} is", "A")]
    assert len(follow("the director of the director of the director of A", [loop[0]], lookup(loop))[1]) == 1


def test_stems_meet_word_forms():
    assert "perfo" in {stem(w) for w in relation_words(mk(*HOPS[0]))} and "perfo" in stems(Q)
    assert "citiz" in {stem(w) for w in relation_words(mk(*HOPS[2]))} and "citiz" in stems(Q)


def test_word_similarity_meets_synonyms_not_other_relations(embedder):
    sim = WordSimilarity(embedder)
    assert sim("married", "spouse") > 0 and sim("born", "birthplace") > 0
    assert sim("born", "died") == 0 and sim("married", "capital") == 0


@pytest.fixture
def ke(kem_settings, embedder):
    editor = KnowledgeEditor.in_memory(settings=kem_settings, embedder=embedder)
    editor.add_many([mk(*h) for h in HOPS] + [mk("Danielle Darrieux", "The mother tongue of {} is", "English")])
    yield editor
    editor.close()


def test_the_editor_composes_the_chain_in_order(ke):
    rw = ke.rewrite_chat([{"role": "user", "content": Q}], follower="kem-editor")
    assert [s.edit.target_new for s in rw.applied] == ["Madonna", "Narendra Modi", "Australia", "Arabic"]
    assert [s.via for s in rw.applied] == [None, *(s.edit.id for s in rw.applied[:-1])]
    system = rw.request[0]["content"]
    order = [system.index(t) for t in ("Hey Jude was performed by", "The director of Madonna",
                                       "Narendra Modi is a citizen", "The official language of Australia")]
    assert order == sorted(order)  # read in order, the answering hop last
    assert system.index("Arabic is the answer to: ") > order[-1]  # the conclusion, nearest the request
    assert rw.applied[1].as_dict()["via"] == rw.applied[0].edit.id


def test_a_request_without_a_chain_is_unchanged(ke, kem_settings, embedder):
    off = KnowledgeEditor(ke.memory, settings=kem_settings.model_copy(update={"chain_depth": 0}))
    for q in ("What is the mother tongue of Danielle Darrieux?", "Who performed Hey Jude?", "What is 2 + 2?"):
        a = ke.rewrite_chat([{"role": "user", "content": q}], follower="kem-editor")
        b = off.rewrite_chat([{"role": "user", "content": q}], follower="kem-editor")
        assert a.request == b.request and [s.edit.id for s in a.applied] == [s.edit.id for s in b.applied]


def test_a_chain_never_leaves_its_namespace(kem_settings, embedder):
    with KnowledgeEditor.in_memory(settings=kem_settings, embedder=embedder) as ke:
        ke.add_many([mk(*HOPS[0], ns="alice"), mk(*HOPS[1], ns="bob"), mk(*HOPS[2], ns="alice")])
        rw = ke.rewrite_chat([{"role": "user", "content": Q}], "alice", follower="kem-editor")
        assert [s.edit.target_new for s in rw.applied] == ["Madonna"]


def test_a_hop_without_a_word_for_its_relation_meets_the_kind_of_answer(embedder):
    q = "What is the capital of the country where the director of Hey Jude's performer was born?"
    edits = [mk(*h) for h in HOPS[:3]] + [mk("Australia", "The capital of {} is", "Perth")]
    _, stems_only = follow(q, [edits[0]], lookup(edits))
    assert [e.target_new for e in stems_only] == ["Narendra Modi"]  # "citizen" is not in the question
    _, typed = follow(q, [edits[0]], lookup(edits), similar=WordSimilarity(embedder))
    assert [e.target_new for e in typed] == ["Narendra Modi", "Australia", "Perth"]  # "country" ~ "Australia"
