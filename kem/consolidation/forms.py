"""The forms an edit is asked in: its own cloze, other phrasings, and a chat question.

Users do not only complete an edit's own prompt: they paraphrase it and ask it as a question. The
consolidation job asks the new weights every form (no context, no fast path) and retires an edit only
when all of them carry the new target (:func:`forms_for`); ``distill`` trains on the same kinds of
forms. Phrasings come from the edit's stored paraphrases and from rules over the relation template
(:func:`alt_clozes`, written for CounterFact's relations like the follower's question rules in
:mod:`kem.follower.questions`). Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kem.edit import Edit
from kem.follower.questions import first_rule, question_for

# (pattern on the lower-cased template, other clozes with {} for the subject), first match wins. Written
# for kem; none is a paraphrase template of CounterFact's edit split (tests/test_distill.py checks). Some
# equal a relation's own template there ("{} is located in"): plain English has few ways to say it.
_ALT: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"twin city", ("{} is twinned with", "The sister city of {} is")),
    (r"mother tongue|native language|first language",
     ("The native language of {} is", "{} grew up speaking", "The first language of {} was")),
    (r"official language", ("The language used officially in {} is", "In {}, the official language is")),
    (r"original language|written in", ("The language {} was originally written in is", "{} was written in the language")),
    (r"language|speaks|spoke|speaker of|writes in|native speaker",
     ("{} is fluent in", "The language {} speaks is", "{} speaks the language")),
    (r"headquarter", ("The headquarters of {} are in", "{} has its head office in", "{} is headquartered in")),
    (r"continent", ("{} is part of the continent of", "The continent {} belongs to is")),
    (r"citizen", ("{} holds citizenship of", "{} has the citizenship of", "The nationality of {} is")),
    (r"country of origin|originat|comes from|is from$|native to|originally from",
     ("{} originated in", "The country of origin of {} is", "{} comes from")),
    (r"country of|in the country|country", ("{} is a place in the country of", "The country {} belongs to is")),
    (r"position|plays as|plays in the", ("{} plays in the position of", "On the field, {} plays as")),
    (r"genre", ("The musical genre of {} is", "{} is known for playing")),
    (r"sport", ("The sport {} plays is", "{} is a professional player of")),
    (r"instrument|performs on|plays the", ("The instrument {} plays is", "{} is a musician who plays the")),
    (r"created by|developed by|product of|produced by|manufactur|made by",
     ("{} is a product of", "{} was developed by", "The company behind {} is")),
    (r"owned by|owner", ("{} belongs to", "The owner of {} is")),
    (r"employ|work(ed|s)? (in|for)|used to work", ("{} was employed by", "The employer of {} is")),
    (r"debut|premiere|aired|broadcast|released on", ("{} was first aired on", "The original network of {} is")),
    (r"born", ("{} was born in the city of", "The birthplace of {} is")),
    (r"died|passed away|life ended|expired at|succumbed", ("{} died in the city of", "The place where {} died is")),
    (r"expertise|expert in|specializ|field of work|works in the field", ("{} works in the field of", "The field of {} is")),
    (r"occupation|profession|works as|by profession", ("The occupation of {} is", "{} earns a living as a")),
    (r"religion|religious|follower of|affiliated with the", ("The religion of {} is", "{} is a follower of")),
    (r"founded by|founder", ("The founder of {} is", "{} was started by", "{} was established by")),
    (r"capital", ("The capital city of {} is", "{}'s capital is")),
    (r"record label|label", ("{} is signed to the label", "The record label of {} is")),
    (r"member of|belongs to|affiliated", ("{} is a member of", "{} belongs to")),
    (r"located|location|is in$|, in$|can be found in|is within|, from$|situated",
     ("{} is located in", "{} can be found in", "The location of {} is")),
)
_ALT_COMPILED = tuple((re.compile(p), alts) for p, alts in _ALT)

# Questions for relations the follower's rules (kem.follower.questions, its training data) do not ask.
_QUESTIONS: tuple[tuple[str, str], ...] = (
    (r"founded by|founder|started by|established by", "Who founded {}?"),
    (r"ceo|chief executive|head of|leader of|led by", "Who leads {}?"),
    (r"written by|author", "Who wrote {}?"),
    (r"directed by|director", "Who directed {}?"),
)
_Q_COMPILED = tuple((re.compile(p), q) for p, q in _QUESTIONS)


def question(template: str) -> str | None:
    """The chat question of ``template``'s relation (``{}`` for the subject): the follower's rules, then
    a few more; None when no rule knows the relation."""
    return question_for(template) or first_rule(template, _Q_COMPILED)


#: Kinds of forms, in the order they are asked.
KINDS = ("cloze", "paraphrase", "question")


def alt_clozes(template: str) -> list[str]:
    """Other clozes (``{}`` for the subject) asking what ``template`` completes; none when no rule knows
    the relation. The template itself is left out.

    >>> alt_clozes("The mother tongue of {} is")[0]
    'The native language of {} is'
    """
    t = " ".join(template.lower().split())
    alts = first_rule(template, _ALT_COMPILED) or ()
    return [a for a in alts if " ".join(a.lower().split()) != t]


@dataclass(frozen=True)
class Form:
    """One way of asking an edit.

    Attributes:
        kind: ``cloze`` (the edit's own prompt), ``paraphrase`` (a stored or generated rephrasing, a
            completion) or ``question`` (a chat question; the answer is free text).
        text: The completion prompt, or the user message of a chat question.
        chat: Asked through the chat template.
        source: ``edit`` (the edit's own text) or ``rule`` (generated from its relation).
    """

    kind: str
    text: str
    chat: bool = False
    source: str = "edit"


def forms_for(edit: Edit, max_paraphrases: int = 2, generated: int = 1) -> list[Form]:
    """The forms the job asks before retiring ``edit``: its cloze, up to ``max_paraphrases`` stored
    paraphrases, ``generated`` rule-made paraphrases, and the chat question when its relation has one.

    Args:
        edit: The edit.
        max_paraphrases: Stored paraphrases asked (the first ones).
        generated: Rule-made phrasings of the relation asked besides them.
    """
    out = [Form("cloze", edit.rendered_prompt)]
    seen = {edit.rendered_prompt.casefold()}
    cands = [(p, "edit") for p in edit.paraphrases[:max_paraphrases]]
    cands += [(_fill(t, edit.subject), "rule") for t in alt_clozes(edit.prompt)[:generated]]
    for text, src in cands:
        if text.casefold() not in seen:
            seen.add(text.casefold())
            out.append(Form("paraphrase", text, source=src))
    q = question(edit.prompt)
    if q is not None:
        out.append(Form("question", _fill(q, edit.subject), chat=True, source="rule"))
    return out


def training_forms(edit: Edit, prefixes: Sequence[str] = ()) -> list[Form]:
    """Forms ``distill`` trains on: every form of :func:`forms_for` (all stored paraphrases, every
    rule-made phrasing) plus the cloze behind each of ``prefixes`` (``"<text>. {}"`` templates)."""
    out = forms_for(edit, max_paraphrases=len(edit.paraphrases), generated=99)
    seen = {f.text for f in out}
    for p in prefixes:
        if p == "{}":
            continue
        text = p.replace("{}", edit.rendered_prompt)
        if text not in seen:
            seen.add(text)
            out.append(Form("paraphrase", text, source="prefix"))
    return out


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


def chat_text(tok: Any, user: str, system: str | None = None) -> str:
    """The generation prompt of a one-turn chat (``user``, after an optional ``system``) in ``tok``'s
    chat template, as text (tokenize it without adding special tokens)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return str(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))


def carries(answer: str, target: str) -> bool:
    """Whether an answer states ``target`` (case-insensitive containment, the job's reliability test)."""
    return target.casefold() in answer.casefold()
