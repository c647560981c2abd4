"""The edit schema: normalisation, templating, and validation errors that name the field."""

from __future__ import annotations

import pytest

from kem.edit import Edit, EditStatus
from kem.errors import KemError, ValidationError


def test_prompt_with_subject_verbatim_becomes_a_template():
    e = Edit(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new=" English ")
    assert e.prompt == "The mother tongue of {} is"
    assert e.rendered_prompt == "The mother tongue of Danielle Darrieux is"
    assert e.target_new == "English" and e.target_completion == " English"
    assert e.fact == "The mother tongue of Danielle Darrieux is English."
    assert e.status == EditStatus.active and e.namespace == "default" and len(e.id) == 32
    assert e.retrieval_keys()[:2] == [e.rendered_prompt, e.fact]


def test_paraphrases_are_cleaned_and_deduplicated():
    e = Edit(subject="X", prompt="{} lives in", target_new="Paris",
             paraphrases=["Where does X live?", "  Where does X live?  ", "X resides in"])
    assert e.paraphrases == ["Where does X live?", "X resides in"]
    assert e.retrieval_keys()[2:] == e.paraphrases


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"prompt": "{} is", "target_new": "y"}, "subject", "Field required"),
        ({"subject": "  ", "prompt": "{} is", "target_new": "y"}, "subject", "empty"),
        ({"subject": "A", "prompt": "B is", "target_new": "y"}, "prompt", "verbatim"),
        ({"subject": "A", "prompt": "{} and {} is", "target_new": "y"}, "prompt", "exactly once"),
        ({"subject": "A", "prompt": "{}", "target_new": "y"}, "prompt", "besides the subject"),
        ({"subject": "A", "prompt": "{} is", "target_new": ""}, "target_new", "at least 1"),
        ({"subject": "A", "prompt": "{} is", "target_new": "y", "namespace": "a b"}, "namespace", "letters"),
        ({"subject": "A", "prompt": "{} is", "target_new": "y", "id": "bad id!"}, "id", "letters"),
        ({"subject": "A", "prompt": "{} is", "target_new": "y", "paraphrases": ["ok", " "]}, "paraphrases", "item 1"),
        ({"subject": "A", "prompt": "{} is", "target_new": "y", "colour": "red"}, "colour", "Extra inputs"),
        ({"subject": "A", "prompt": "{} is", "target_new": "y", "status": "consolidated"}, "consolidated_in",
         "model version"),
    ],
)
def test_bad_edits_name_the_field(data, field, words):
    with pytest.raises(ValidationError) as info:
        Edit.parse(data)
    err = info.value
    assert isinstance(err, KemError) and isinstance(err, ValueError)
    assert err.field == field
    assert f"Edit.{field}" in str(err) and words in str(err)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(ValidationError) as info:
        Edit.parse({"subject": "", "prompt": "", "target_new": ""})
    msg = str(info.value)
    for f in ("subject", "prompt", "target_new"):
        assert f"Edit.{f}" in msg


def test_parse_overrides_and_round_trip():
    e = Edit.parse({"subject": "A", "prompt": "{} is", "target_new": "y"}, namespace="alice", source=None)
    assert e.namespace == "alice" and e.source is None
    again = Edit.parse(e.model_dump(mode="json"))
    assert again == e


def test_user_demonstrations_file_and_errors(tmp_path, monkeypatch):
    from kem.compose import load_demos
    from kem.settings import Settings

    good = tmp_path / "demos.jsonl"
    good.write_text('{"kind": "update", "fact": "The sky is green.", "prompt": "The sky is", "answer": "green"}\n')
    assert [d.answer for d in load_demos(good)] == ["green"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"kind": "shout", "fact": "a", "prompt": "b", "answer": "c"}\n')
    with pytest.raises(ValidationError) as info:
        load_demos(bad)
    assert "line 2" in str(info.value) and "kind" in str(info.value)
    monkeypatch.setenv("KEM_DEMOS", str(good))
    monkeypatch.setenv("KEM_DEMO_SELECTION", "similar")
    s = Settings()
    assert s.demos == good and s.demo_selection == "similar"
    monkeypatch.setenv("KEM_DEMO_SELECTION", "random")
    with pytest.raises(Exception, match="demo_selection"):
        Settings()


@pytest.mark.parametrize("prompt", ["The maker of A{}B is", "The maker of {} is"])
def test_subject_with_braces_is_refused_and_nothing_stored_is_lost(tmp_path, prompt):
    """"A{}B" as a subject used to turn "The maker of A{}B is" into "The maker of AA{}BB is"."""
    from kem.stores.sqlite import SQLiteStore

    with pytest.raises(ValidationError) as info:
        Edit.parse({"subject": "A{}B", "prompt": prompt, "target_new": "Acme"})
    assert info.value.field == "subject" and str(info.value).startswith('Edit.subject must not contain "{}"')
    store = SQLiteStore(tmp_path / "e.sqlite")
    kept = store.add(Edit(subject="Acme", prompt="The maker of {} is", target_new="Bob"))
    # a record from before the check (stored then, validated by nothing now) still reads back
    old = Edit(subject="C{}D", prompt="{} was founded in", target_new="1900")
    with store._tx() as db:
        db.execute("INSERT INTO edits (id, namespace, subject_key, relation_key, status, data) VALUES (?,?,?,?,?,?)",
                   (old.id, old.namespace, old.subject_key, old.relation_key, old.status.value, old.model_dump_json()))
    rev = store.revision()
    with pytest.raises(ValidationError, match="Edit.subject"):
        store.add(Edit(subject="A{}B", prompt=prompt, target_new="Acme"))
    with pytest.raises(ValidationError, match="Edit.subject"):
        store.update(kept.id, {"subject": "A{}B"})
    assert store.revision() == rev and store.get(kept.id) == kept
    assert [e.id for e in store.list()] == [kept.id, old.id] and store.get(old.id).rendered_prompt == "C{}D was founded in"
    store.delete(old.id)  # and can be removed
    store.close()
