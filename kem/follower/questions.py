"""Question forms of CounterFact-style cloze templates, for the edit-follower's training set.

CounterFact records carry clozes ("The mother tongue of {} is") but users also ask questions ("What is
the mother tongue of Danielle Darrieux?"). Each rule maps a cloze template (matched by keywords, first
rule wins) to a question about the same subject and relation. Templates no rule knows get none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

# (pattern on the lower-cased template, question with {} for the subject)
_RULES: tuple[tuple[str, str], ...] = (
    (r"twin city", "What is the twin city of {}?"),
    (r"mother tongue", "What is the mother tongue of {}?"),
    (r"native language", "What is the native language of {}?"),
    (r"official language", "What is the official language of {}?"),
    (r"original language", "What is the original language of {}?"),
    (r"^in \{\}.*(language|understand|speak)", "What language is spoken in {}?"),
    (r"language (of|used by) \{\}", "What is the language of {}?"),
    (r"written in", "What language was {} written in?"),
    (r"language|speaks|spoke|speaker of|writes in|native speaker", "What language does {} speak?"),
    (r"headquarter", "Where is the headquarters of {}?"),
    (r"continent", "Which continent is {} in?"),
    (r"country of|in the country", "Which country is {} in?"),
    (r"citizen", "Which country is {} a citizen of?"),
    (r"position|plays as", "Which position does {} play?"),
    (r"genre", "What genre of music does {} play?"),
    (r"sport", "Which sport does {} play?"),
    (r"instrument|performs on|plays the", "Which instrument does {} play?"),
    (r"created by|developed by|product of|produced by|manufactur|made by", "Which company created {}?"),
    (r"owned by|owner", "Who owns {}?"),
    (r"employ|work(ed|s)? (in|for)|used to work", "Where did {} work?"),
    (r"debut|premiere|aired|broadcast|released on", "Which network did {} premiere on?"),
    (r"born", "Where was {} born?"),
    (r"died|passed away|life ended|expired at|succumbed", "Where did {} die?"),
    (r"expertise|expert in|specializ", "What is the area of expertise of {}?"),
    (r"occupation|profession|works as|by profession", "What is the occupation of {}?"),
    (r"religion|religious|follower of", "What religion does {} follow?"),
    (r"native to|originally from|is from$|based in|created in|formed in|started in|founded in", "Where is {} from?"),
    (r"capital", "What is the capital of {}?"),
    (r"located|location|is in$|, in$|can be found in|is within|, from$|originat", "Where is {} located?"),
)
_COMPILED = tuple((re.compile(p), q) for p, q in _RULES)


def question_for(template: str) -> str | None:
    """A question (with ``{}`` for the subject) asking what ``template`` completes, or None.

    >>> question_for("The mother tongue of {} is")
    'What is the mother tongue of {}?'
    """
    return first_rule(template, _COMPILED)


def first_rule(template: str, rules: Sequence[tuple[re.Pattern[str], T]]) -> T | None:
    """The value of the first rule whose pattern matches ``template`` (lower-cased, spaces collapsed)."""
    t = " ".join(template.lower().split())
    return next((value for pat, value in rules if pat.search(t)), None)
