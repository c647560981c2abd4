"""Do two edits of one subject state the same relation? The test behind supersede-on-write.

A new edit supersedes a live edit of the same namespace and subject when they state the same
relation (:func:`kem.stores.rules.resolve`). The stores decide "same" by the relation key alone (the
relation id, else the exact template). :class:`RelationMatcher` goes further for edits without a
relation id, in this order:

1. Each edit gets a relation id: its own ``relation``, else the id its normalised template has in
   kem's relation vocabulary (``kem/data/relation_templates.json``: 180-odd phrasings of 34 Wikidata
   relations, from the CounterFact train split; ``scripts/build_relation_vocab.py``). When both have
   one, the ids decide, nothing else ("P19", born in, is never "P20", died in).
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


@cache
def vocabulary() -> dict[str, str]:
    """kem's relation vocabulary: normalised template -> relation id."""
    return dict(json.loads(VOCAB_FILE.read_text(encoding="utf-8"))["templates"])


def relation_of(edit: Edit) -> str | None:
    """The edit's relation id: its own, else its template's in the vocabulary, else None."""
    if edit.relation:
        return edit.relation.casefold()
    rel = vocabulary().get(normalise_template(edit.prompt))
    return rel.casefold() if rel else None


class RelationMatcher:
    """Finds, for new edits, the live edits of the same subject that state the same relation.

    Args:
        embedder: Embeds templates (only those of subjects with another live edit).
        threshold: Cosine between two templates at or above which they are one relation.
    """

    def __init__(self, embedder: Embedder, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.embedder = embedder
        self.threshold = threshold
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
            rn, ro = relation_of(new), relation_of(old)
            if rn is not None and ro is not None:
                out.append(rn == ro)
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
