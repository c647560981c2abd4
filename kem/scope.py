"""The scope decision (SERAC's question, answered without training): does a retrieved edit apply?

A retrieved edit is in scope when the request is close enough to one of its retrieval keys. Closeness
is the cosine similarity from the index, with a lower bar when the request names the edit's subject
(``subject_match`` 1.0: the subject appears in the request): "Where is Danielle Darrieux from?" names
the subject, "Michel Rocard is a native speaker of" shares the relation but not the subject, and a
request about "Project Falcon 0" does not name "Project Falcon 1". A request that names a sibling of
the subject (the same words with another number: "Project Falcon 0", "Renault 14" for "Renault 4")
is about another entity: the edit stays out of scope however similar the wording
(:func:`names_a_sibling`; embeddings barely tell such requests apart: cosine 0.92 for the Falcons). The thresholds were calibrated on the
CounterFact *train* split (``bench/calibrate_scope.py``); the score and both signals are exposed on
every retrieved edit so callers can see why.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from kem.edit import Edit
from kem.protocols import ScoredEdit

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset("the of a an and in on at to for de la le von van der du da di y is was".split())
_DIGIT = re.compile(r"\d")
PARTIAL = 0.9  # a subject that does not appear scores at most this (its fraction of words found, scaled)


def _words(text: str) -> list[str]:
    """Casefolded words without accents or punctuation: ``"Émile-Zola's"`` -> ``["emile", "zola", "s"]``."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return _WORD.findall(text.casefold())


def _content(words: list[str]) -> list[str]:
    """``words`` without stopwords."""
    return [w for w in words if w not in _STOP]


def subject_match(query: str, subject: str) -> float:
    """1.0 when ``subject`` appears in ``query``; below 1.0, how much of it does.

    "Appears": the subject's words, normalised (casefolded, accents and punctuation dropped,
    stopwords aside), occur as one consecutive run of the query's words (stopwords aside as well).
    So "Danielle Darrieux's" and "DANIELLE DARRIEUX" name "Danielle Darrieux", while "Renault 14"
    does not name "Renault 4", nor "Project Falcon 0" name "Project Falcon 1". Otherwise the score is
    :data:`PARTIAL` times the fraction of the subject's words found in the query (shown to callers and
    used for ranking; it never reaches 1.0).
    """
    s_all = _words(subject)
    words = _content(s_all)
    qwords = _content(_words(query)) if words else _words(query)
    words = words or s_all  # a subject made of stopwords only is matched as it is
    if not words:
        return 0.0
    n = len(words)
    if any(qwords[i:i + n] == words for i in range(len(qwords) - n + 1)):
        return 1.0
    remaining = list(qwords)
    found = 0
    for w in words:  # each query word matches at most one subject word ("Jackson Jackson")
        if w in remaining:
            remaining.remove(w)
            found += 1
    return PARTIAL * found / n


def names_a_sibling(query: str, subject: str) -> bool:
    """Whether ``query`` names the subject with other numbers: another entity of the same name.

    True when some run of the query's words (normalised as in :func:`subject_match`) equals the
    subject's words except at positions where both words contain digits and differ: "Project
    Falcon 0" or "Project Falcon 12" for "Project Falcon 1", "iPhone 12 Pro" for "iPhone 11 Pro".
    """
    words = _content(_words(subject))
    if not any(_DIGIT.search(w) for w in words):
        return False
    qwords = _content(_words(query))
    n = len(words)
    for i in range(len(qwords) - n + 1):
        diff = [(a, b) for a, b in zip(qwords[i:i + n], words, strict=True) if a != b]
        if diff and all(_DIGIT.search(a) and _DIGIT.search(b) for a, b in diff):
            return True
    return False


@dataclass(frozen=True)
class ScopeConfig:
    """Thresholds of the scope decision.

    Attributes:
        threshold: Cosine similarity above which an edit applies whatever the wording.
        subject_threshold: Cosine similarity above which an edit applies when the subject is named.
        min_subject_match: ``subject_match`` from which the subject counts as named. 1.0 (default):
            the subject must appear in the request; lower values also accept partial mentions, at
            the cost of near-identical subjects ("Project Falcon 0" for "Project Falcon 1").
        max_edits: At most this many in-scope edits enter one prompt.
    """

    threshold: float = 0.85
    subject_threshold: float = 0.35
    min_subject_match: float = 1.0
    max_edits: int = 3

    def __post_init__(self) -> None:
        for name in ("threshold", "subject_threshold", "min_subject_match"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"ScopeConfig.{name} must be within [-1, 1] (got {v})")
        if self.max_edits < 1:
            raise ValueError(f"ScopeConfig.max_edits must be >= 1 (got {self.max_edits})")


class ScopeClassifier:
    """Turns ``(edit, similarity)`` hits into :class:`~kem.protocols.ScoredEdit` verdicts."""

    def __init__(self, config: ScopeConfig | None = None) -> None:
        self.config = config or ScopeConfig()

    def decide(self, query: str, hits: list[tuple[Edit, float]]) -> list[ScoredEdit]:
        """Score every hit; in-scope ones first (best first), capped at ``max_edits`` in scope."""
        c = self.config
        scored = []
        for edit, sim in hits:
            sm = subject_match(query, edit.subject)
            ok = (sim >= c.threshold or (sm >= c.min_subject_match and sim >= c.subject_threshold)) \
                and not (sm < 1.0 and names_a_sibling(query, edit.subject))
            scored.append(ScoredEdit(edit, sim, sm, ok))
        scored.sort(key=lambda s: (not s.in_scope, -(s.score + 0.5 * s.subject_match)))
        kept, n_in = [], 0
        for s in scored:
            if s.in_scope:
                n_in += 1
                if n_in > c.max_edits:
                    s = ScoredEdit(s.edit, s.score, s.subject_match, False)
            kept.append(s)
        return kept
