"""Do two edits of one subject state the same relation? The test behind supersede-on-write.

A new edit supersedes a live edit of the same namespace and subject when they state the same
relation (:func:`kem.stores.rules.resolve`). The stores decide "same" by the relation key alone (the
relation id, else the exact template). :class:`RelationMatcher` goes further for edits without a
relation id, in this order:

1. Each edit gets a relation id: its own ``relation``, else the id its normalised template has in
   kem's relation vocabulary (``kem/data/relation_templates.json``: 180-odd phrasings of 34 Wikidata
   relations, from the CounterFact train split; ``scripts/build_relation_vocab.py``). When both have
   one, the ids decide, nothing else ("P19", born in, is never "P20", died in). A template the
   vocabulary knows for several relations ("{} is located in") is read by the edit's answers
   ("Asia": P30, continent; "California": a region or a location), and it matches an edit of a known
   relation when that relation is among those (:func:`by_answer`).
2. Else the templates are equal once normalised (:func:`normalise_template`: case, punctuation,
   "is"/"was").
3. Else the embeddings of the two templates, with a neutral stand-in for the subject, are at least
   ``threshold`` close in cosine (``supersede_threshold``, default 0.9: on the vocabulary's templates,
   pairs of different relations reach 0.9 in 5 of 19,042 pairs, and only 16% of same-relation pairs
   do; so this step is a cautious last resort, and a relation id is the way to be sure; docs/time.md).

It only ever compares edits of one namespace and one subject; the store checks that again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from kem.edit import Edit
from kem.protocols import Embedder

DEFAULT_THRESHOLD = 0.9
STAND_IN = "X"  # what replaces "{}" when a template is embedded (the subject itself would dominate)
_PAST = {"was": "is", "were": "are", "has been": "is", "had": "has"}
_PUNCT = re.compile(r"[^\w{}\s]")


def normalise_template(template: str) -> str:
    """``"The mother tongue of {} was:"`` -> ``"the mother tongue of {} is"``: case, punctuation and the
    past tense of "to be" folded, whitespace collapsed."""
    words = _PUNCT.sub(" ", template.casefold()).split()
    return " ".join(_PAST.get(w, w) for w in words)


def template_text(edit: Edit) -> str:
    return edit.prompt.replace("{}", STAND_IN)


VOCAB_FILE = Path(__file__).parent / "data" / "relation_templates.json"


AMBIGUITY_RATIO = 3.0  # an answer picks one relation of an ambiguous template when this many times likelier


@cache
def _vocab_file() -> dict[str, Any]:
    return dict(json.loads(VOCAB_FILE.read_text(encoding="utf-8")))


def vocabulary() -> dict[str, str]:
    """kem's relation vocabulary: normalised template -> relation id."""
    return dict(_vocab_file()["templates"])


def by_answer(template: str, answers: Sequence[str | None]) -> frozenset[str]:
    """The relations an ambiguous template ("{} is located in": country, continent, region...) may
    state, read from the edit's answers: the candidates whose known answers hold them, within
    :data:`AMBIGUITY_RATIO` of the likeliest. Empty when the template is not ambiguous or the answers
    are unknown."""
    data = _vocab_file()
    cands = data.get("ambiguous", {}).get(normalise_template(template))
    if not cands:
        return frozenset()
    values = data.get("values", {})
    score: dict[str, float] = {}
    for rel in cands:
        known = values.get(rel, {})
        total = sum(known.values()) or 1
        score[rel] = sum(known.get(a.casefold(), 0) for a in answers if a) / total
    best = max(score.values())
    if best == 0:
        return frozenset()
    return frozenset(r.casefold() for r, v in score.items() if v * AMBIGUITY_RATIO >= best)


def relations_of(edit: Edit, vocab: dict[str, str] | None = None) -> frozenset[str]:
    """The relation ids the edit may state: its own; else its template's in ``vocab`` (default: kem's
    :func:`vocabulary`); else, for a template kem's vocabulary knows for several relations, those its
    answers point to (:func:`by_answer`); else none (unknown)."""
    if edit.relation:
        return frozenset({edit.relation.casefold()})
    rel = (vocabulary() if vocab is None else vocab).get(normalise_template(edit.prompt))
    if rel is not None:
        return frozenset({rel.casefold()})
    return by_answer(edit.prompt, (edit.target_new, edit.target_true)) if vocab is None else frozenset()


def relation_of(edit: Edit, vocab: dict[str, str] | None = None) -> str | None:
    """The edit's relation id when :func:`relations_of` names exactly one, else None."""
    rels = relations_of(edit, vocab)
    return next(iter(rels)) if len(rels) == 1 else None


class RelationMatcher:
    """Finds, for new edits, the live edits of the same subject that state the same relation.

    Args:
        embedder: Embeds templates (only those of subjects with another live edit).
        threshold: Cosine between two templates at or above which they are one relation.
        vocab: Normalised template -> relation id (default: kem's :func:`vocabulary`; pass your own
            relations' phrasings, merged with it or not).
    """

    def __init__(self, embedder: Embedder, threshold: float = DEFAULT_THRESHOLD,
                 vocab: dict[str, str] | None = None) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.vocab = vocab  # None: kem's own (with its ambiguous templates read by their answers)
        self._cache: dict[str, np.ndarray] = {}

    def _vectors(self, templates: Sequence[str]) -> dict[str, np.ndarray]:
        todo = [t for t in dict.fromkeys(templates) if t not in self._cache]
        if todo:
            for t, v in zip(todo, self.embedder.embed(todo), strict=True):
                if len(self._cache) > 50_000:
                    self._cache.clear()
                self._cache[t] = v
        return {t: self._cache[t] for t in templates}

    def decide(self, pairs: Sequence[tuple[Edit, Edit]]) -> list[bool]:
        """For each ``(new, old)`` pair of one namespace and subject: the same relation?"""
        out: list[bool | None] = []
        need: list[str] = []
        for new, old in pairs:
            rn, ro = relations_of(new, self.vocab), relations_of(old, self.vocab)
            if rn and ro and (len(rn) == 1 or len(ro) == 1):  # one side certain: the other may agree
                out.append(bool(rn & ro))
            elif new.prompt == old.prompt or normalise_template(new.prompt) == normalise_template(old.prompt):
                out.append(True)
            else:
                out.append(None)
                need += [template_text(new), template_text(old)]
        if need:
            vecs = self._vectors(need)
            for i, (new, old) in enumerate(pairs):
                if out[i] is None:
                    cos = float(vecs[template_text(new)] @ vecs[template_text(old)])
                    out[i] = cos >= self.threshold
        return [bool(x) for x in out]

    def similarity(self, a: str, b: str) -> float:
        """Cosine between two templates as this matcher sees them (for calibration and docs)."""
        ta, tb = a.replace("{}", STAND_IN), b.replace("{}", STAND_IN)
        vecs = self._vectors([ta, tb])
        return float(vecs[ta] @ vecs[tb])

    def matches(self, new_edits: Sequence[Edit], live: Sequence[Edit]) -> dict[str, list[str]]:
        """``{new edit id: [ids of edits it states the same fact as]}``, over ``live`` (the store's live
        edits of the new edits' subjects) and the earlier new edits of the same batch."""
        by_subject: dict[tuple[str, str], list[Edit]] = {}
        for e in live:
            by_subject.setdefault((e.namespace, e.subject_key), []).append(e)
        pairs: list[tuple[Edit, Edit]] = []
        for e in new_edits:
            key = (e.namespace, e.subject_key)
            pairs += [(e, o) for o in by_subject.get(key, []) if o.id != e.id]
            by_subject.setdefault(key, []).append(e)
        found: dict[str, list[str]] = {}
        for (new, old), same in zip(pairs, self.decide(pairs), strict=True):
            if same:
                found.setdefault(new.id, []).append(old.id)
        return found
