"""Chains of edits (multi-hop): follow an in-scope edit's new object to the next stored edit.

"What is the official language of the country of citizenship of the director of Hey Jude's
performer?" names one subject, Hey Jude. Retrieval finds the first hop ("Hey Jude was performed by
Madonna"); the next facts are about Madonna, then about her director, and so on, and their subjects
are not in the question at all. So after the scope decision kem looks, for each applied edit, at the
live edits of the same namespace whose subject *is* that edit's new object ("Madonna"), and keeps one
whose relation the request also asks about: a word of its template meets a word of the request not
taken by an earlier edit of the chain (see :func:`_meets`), by a five-letter stem ("performed" meets "performer", "citizen" meets
"citizenship") or, with an embedder, by word embeddings at cosine >= :data:`WORD_SIMILARITY`
("married" meets "spouse" at 0.82, "born" meets "birthplace" at 0.67; "born" and "died" stay apart
at 0.41). It repeats from the new object, up to ``max_depth`` hops, and keeps the
longest chain (ties: the one whose words meet the request's better: a stem counts 1, a similar word its
cosine).

Every hop is an exact entity link (object -> subject, case-folded) inside one namespace, so a chain
can never reach another tenant's edits, and a request whose applied edits lead nowhere is left
exactly as it was (one indexed store query per hop tried; none when no edit applies).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from kem.edit import Edit
from kem.protocols import Embedder

MAX_DEPTH = 4  # hops after the first
WORD_SIMILARITY = 0.6
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
STOP = frozenset("""
a about also an and are as at be been being by called can could did do does for from had has have he her his
how i in into is it its known me my name named of on one or our she so that the their them then there these
they this to us was we were what when where which who whom whose why will with would you your s
""".split())


def words(text: str) -> list[str]:
    """Content words of ``text``, case-folded, in order (stop words dropped)."""
    return [w for w in _WORD.findall(text.casefold()) if w not in STOP and len(w) > 1]


def stem(word: str) -> str:
    """A word cut to five letters: "performed" and "performer" meet, so do "citizen" and "citizenship"."""
    return word[:5]


def stems(text: str) -> list[str]:
    """Content words of ``text``, stemmed, in order."""
    return [stem(w) for w in words(text)]


def relation_words(edit: Edit) -> frozenset[str]:
    """What an edit's relation is called: its template's content words (the subject left out)."""
    return frozenset(words(edit.prompt.replace("{}", " ")))


class WordSimilarity:
    """Word-to-word cosine with an embedder, cached (a request's words, a template's words)."""

    def __init__(self, embedder: Embedder, threshold: float = WORD_SIMILARITY, cache_size: int = 20_000) -> None:
        self.embedder = embedder
        self.threshold = threshold
        self.cache_size = cache_size
        self._vec: dict[str, np.ndarray] = {}

    def vectors(self, ws: Sequence[str]) -> dict[str, np.ndarray]:
        todo = [w for w in dict.fromkeys(ws) if w not in self._vec]
        if todo:
            if len(self._vec) + len(todo) > self.cache_size:
                self._vec.clear()
            self._vec.update(zip(todo, self.embedder.embed(todo), strict=True))
        return {w: self._vec[w] for w in ws}

    def __call__(self, a: str, b: str) -> float:
        """The cosine of ``a`` and ``b`` when it reaches the threshold, else 0."""
        v = self.vectors([a, b])
        cos = float(v[a] @ v[b])
        return cos if cos >= self.threshold else 0.0


def _meets(rel: frozenset[str], asked: Sequence[str], used: frozenset[int],
           similar: Callable[[str, str], float] | None, answer: str | None = None) -> tuple[frozenset[int], float] | None:
    """The positions of the request's words (not yet ``used``) that an edit's relation words ``rel``
    take, and how well they meet: each relation word takes the first free word with its five-letter
    stem (1 each); with none of those, the one most similar word (its cosine). None when nothing meets.
    A word said twice ("the director of the director of") can serve two hops; a relation's own words
    are all taken, so a chain needs a word the earlier edits' templates do not have ("Kharkiv is a twin
    city of" never leads on to the twin city of Kharkiv's twin). Last, with ``answer`` (the hop's new
    object), a request word similar to it (weighted half): "the capital of the **country** where the
    director was born" takes "Narendra Modi is a citizen of Australia" by "country" ~ "Australia" (0.71)."""
    took: set[int] = set()
    for r in sorted(rel):
        i = next((i for i, q in enumerate(asked) if i not in used and i not in took and stem(q) == stem(r)), None)
        if i is not None:
            took.add(i)
    if took:
        return frozenset(took), float(len(took))
    if similar is None:
        return None
    best, best_score = None, 0.0
    for i, q in enumerate(asked):
        if i not in used:
            score = max((similar(r, q) for r in rel), default=0.0)
            if score > best_score:
                best, best_score = i, score
    if best is None and answer:  # no word for the relation: the kind of answer ("the country where X was born")
        for i, q in enumerate(asked):
            if i not in used:
                score = similar(q, answer) * 0.5
                if score > best_score:
                    best, best_score = i, score
    return None if best is None else (frozenset({best}), best_score)


def follow(query: str, starts: Sequence[Edit], next_edits: Callable[[str], list[Edit]],
           max_depth: int = MAX_DEPTH, similar: Callable[[str, str], float] | None = None,
           ) -> tuple[Edit, list[Edit]] | None:
    """The best chain from one of ``starts``: ``(start, [hop 2, hop 3, ...])``, or None when no start
    leads anywhere.

    Args:
        query: The request's text (the last user message, or the completion prompt).
        starts: The applied edits.
        next_edits: ``subject key -> live edits about it`` (one namespace; the caller filters by time).
        max_depth: Most hops after the start.
        similar: Word similarity beyond stems (e.g. :class:`WordSimilarity`); None: stems only.
    """
    asked = words(query)
    if not asked or max_depth < 1:
        return None
    best: tuple[tuple[int, float], Edit, list[Edit]] | None = None
    cache: dict[str, list[Edit]] = {}

    def after(e: Edit) -> list[Edit]:
        key = e.target_new.casefold()
        if key not in cache:
            cache[key] = next_edits(key)
        return cache[key]

    def walk(start: Edit, path: list[Edit], used: frozenset[int], score: float) -> None:
        nonlocal best
        if path:
            rank = (len(path), score)
            if best is None or rank > best[0]:
                best = (rank, start, list(path))
        if len(path) >= max_depth:
            return
        last = path[-1] if path else start
        seen = {start.id, *(e.id for e in path)}
        for nxt in after(last):
            if nxt.id in seen:
                continue
            met = _meets(relation_words(nxt), asked, used, similar, nxt.target_new.casefold())
            if met is not None:
                walk(start, [*path, nxt], used | met[0], score + met[1])

    for s in starts:
        first = _meets(relation_words(s), asked, frozenset(), None)
        walk(s, [], frozenset() if first is None else first[0], 0.0)
    return None if best is None else (best[1], best[2])
