"""The scope decision: the subject counts as named only when it appears in the request."""

from __future__ import annotations

import numpy as np
import pytest

from kem.edit import Edit
from kem.scope import ScopeClassifier, names_a_sibling, subject_match


@pytest.mark.parametrize(
    ("query", "subject"),
    [
        ("What is the mother tongue of Danielle Darrieux?", "Danielle Darrieux"),
        ("what is DANIELLE DARRIEUX's mother tongue?", "Danielle Darrieux"),
        ("Where was Emile Zola born?", "Émile Zola"),
        ("Who founded Jean-Paul Gaultier", "Jean Paul Gaultier"),
        ("Who sang with the Beatles?", "The Beatles"),
        ("The headquarters of Bank of America are in", "Bank of America"),
    ],
)
def test_the_subject_appears(query: str, subject: str) -> None:
    assert subject_match(query, subject) == 1.0


@pytest.mark.parametrize(
    ("query", "subject"),
    [
        ("Who leads Project Falcon 0?", "Project Falcon 1"),
        ("Who leads Project Falcon 12?", "Project Falcon 1"),
        ("Renault 14 is made by", "Renault 4"),
        ("Falcon Project 1 is led by", "Project Falcon 1"),  # the words, not the subject
        ("Who wrote Darrieux's biography?", "Danielle Darrieux"),
    ],
)
def test_near_identical_subjects_do_not_appear(query: str, subject: str) -> None:
    assert subject_match(query, subject) < 1.0


def test_edits_of_near_identical_subjects_stay_out_of_scope(embedder) -> None:
    """With edits for "Project Falcon 1" and "Project Falcon 2", a request about "Project Falcon 0"
    used to apply both (2 of 3 subject words found passed the lower similarity bar)."""
    edits = [Edit(subject=f"Project Falcon {i}", prompt="The lead engineer of {} is", target_new=name)
             for i, name in ((1, "Ada Park"), (2, "Ben Ortiz"))]
    keys = [embedder.embed(e.retrieval_keys()) for e in edits]

    def in_scope(query: str) -> list[str]:
        q = embedder.embed([query])[0]
        hits = [(e, float(np.max(k @ q))) for e, k in zip(edits, keys, strict=True)]
        return [s.edit.subject for s in ScopeClassifier().decide(query, hits) if s.in_scope]

    assert in_scope("Who is the lead engineer of Project Falcon 0?") == []
    assert in_scope("Who is the lead engineer of Project Falcon 1?") == ["Project Falcon 1"]
    assert in_scope("Tell me who leads project falcon 2.") == ["Project Falcon 2"]


@pytest.mark.parametrize(
    ("query", "subject", "sibling"),
    [
        ("Who leads Project Falcon 0?", "Project Falcon 1", True),
        ("Who leads project falcon 12?", "Project Falcon 1", True),
        ("Is the iPhone 12 Pro waterproof?", "iPhone 11 Pro", True),
        ("Renault 14 is made by", "Renault 4", True),
        ("Who leads Project Falcon?", "Project Falcon 1", False),  # no number: maybe this one
        ("Who leads Project Eagle 0?", "Project Falcon 1", False),
        ("Who leads Project Falcon 1?", "Project Falcon 1", False),
        ("Who leads Project Hawk?", "Project Falcon", False),
    ],
)
def test_names_a_sibling(query: str, subject: str, sibling: bool) -> None:
    assert names_a_sibling(query, subject) is sibling
