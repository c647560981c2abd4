"""The scope decision (SERAC's question, answered without training): does a retrieved edit apply?

A retrieved edit is in scope when the request is close enough to one of its retrieval keys. Closeness
is the cosine similarity from the index, with a lower bar when the request names the edit's subject
(``subject_match``): "Where is Danielle Darrieux from?" names the subject, "Michel Rocard is a native
speaker of" shares the relation but not the subject. The thresholds were calibrated on the
CounterFact *train* split (``bench/calibrate_scope.py``); the score and both signals are exposed on
every retrieved edit so callers can see why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kem.edit import Edit
from kem.protocols import ScoredEdit

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset("the of a an and in on at to for de la le von van der du da di y is was".split())


def subject_match(query: str, subject: str) -> float:
    """Fraction (0..1) of the subject's words (stopwords aside) that appear as words in ``query``.

    The whole subject appearing verbatim (case-insensitive, on word boundaries) scores 1.0; so
    "Renault 4" does not match "Renault 14".
    """
    q = query.casefold()
    s = subject.casefold().strip()
    if s and re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", q):
        return 1.0
    words = [w for w in _WORD.findall(s) if w not in _STOP] or _WORD.findall(s)
    if not words:
        return 0.0
    qwords = _WORD.findall(q)
    remaining = list(qwords)
    found = 0
    for w in words:  # each query word matches at most one subject word ("Jackson Jackson")
        if w in remaining:
            remaining.remove(w)
            found += 1
    return found / len(words)


@dataclass(frozen=True)
class ScopeConfig:
    """Thresholds of the scope decision.

    Attributes:
        threshold: Cosine similarity above which an edit applies whatever the wording.
        subject_threshold: Cosine similarity above which an edit applies when the subject is named.
        min_subject_match: ``subject_match`` from which the subject counts as named.
        max_edits: At most this many in-scope edits enter one prompt.
    """

    threshold: float = 0.85
    subject_threshold: float = 0.35
    min_subject_match: float = 0.67
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
            ok = sim >= c.threshold or (sm >= c.min_subject_match and sim >= c.subject_threshold)
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
