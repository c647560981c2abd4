"""distill steps 1-2: the examples. Each edit's forms labelled by the teacher (the served fast path),
and the retain set labelled by the parent model itself.

Edit side: every form of :func:`kem.consolidation.forms.training_forms` (the cloze, stored and
rule-made paraphrases, the cloze behind generated prefixes, the chat question). The teacher is kem's
fast path: the parent weights + the edit-follower LoRA + the fact in context, in the exact format
served (:func:`kem.compose.follower_completion` / :func:`~kem.compose.follower_chat`). A completion
answer is cut right after the target; an answer that does not carry the target (the fast path would
miss it too) is replaced by the target (completions) or the fact sentence (chat) and counted.

Retain side: facts of other subjects (``kem/data/retain_pool.json``, CounterFact train split only:
``scripts/build_retain_pool.py``): the nearest relations to each edit's, random ones, other relations
of the edited subject, and chat questions about them. Each becomes the prompt plus the parent's greedy
continuation; training matches the parent's full distributions there (KL).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kem.consolidation.forms import Form, alt_clozes, carries, chat_text, question, training_forms
from kem.edit import Edit


@dataclass(frozen=True)
class Item:
    """One training sequence: ``prompt`` ids then ``answer`` ids.

    Attributes:
        kind: ``edit`` (cross-entropy on the answer) or ``retain`` (KL to the parent on the answer).
        edit: Index of the edit (-1 for retain).
        form: The form's kind (cloze / paraphrase / question / retain).
    """

    kind: str
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    edit: int = -1
    form: str = ""


def encode(tok: Any, prompt: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    return tuple(p), tuple(a)


def end_of_turn(tok: Any) -> str:
    """The text that ends an assistant turn in the chat template (``<|im_end|>`` for SmolLM2)."""
    prefix = chat_text(tok, "x")
    full = str(tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                       tokenize=False))
    tail = full[len(prefix):] if full.startswith(prefix) else "y"
    return tail.split("y", 1)[1].rstrip("\n") if "y" in tail else ""


def cut_after(answer: str, target: str) -> str | None:
    """``answer`` up to and including the first ``target`` (case-insensitive), or None."""
    i = answer.casefold().find(target.casefold())
    return None if i < 0 else answer[: i + len(target)]


# ---- the edit side ---------------------------------------------------------------------------------------
def edit_forms(edits: Sequence[Edit], prefixes: Sequence[str]) -> list[list[Form]]:
    return [training_forms(e, prefixes) for e in edits]


def teacher_labels(model: Any, tok: Any, edits: Sequence[Edit], forms: Sequence[Sequence[Form]],
                   follower: Path | None, chat_tokens: int, progress: bool = False,
                   shortcut: bool = True) -> tuple[list[list[str]], int]:
    """The answers the fast path gives to every form (``(answers per edit, forms whose teacher answer
    missed the target)``); with no follower, the target / fact sentence. ``shortcut``: completions the
    teacher answers with the target right away are found by one teacher-forced pass, not generated."""
    from kem.compose import follower_chat, follower_completion
    from kem.consolidation.judge import greedy

    labels: list[list[str]] = [[_fallback(e, f) for f in fs] for e, fs in zip(edits, forms, strict=True)]
    if follower is None:
        return labels, 0
    from kem.follower.lora import LoraHooks, WithLora

    hooks = LoraHooks(model, follower)
    teacher = WithLora(model, hooks)
    comp: list[tuple[int, int, str]] = []
    chat: list[tuple[int, int, str]] = []
    for i, (e, fs) in enumerate(zip(edits, forms, strict=True)):
        for j, f in enumerate(fs):
            if f.chat:
                msgs = follower_chat([{"role": "user", "content": f.text}], [e.fact])
                chat.append((i, j, str(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))))
            else:
                comp.append((i, j, follower_completion(f.text, [e.fact])))
    # a completion the teacher answers with the target right away is labelled with the target: one
    # teacher-forced pass tells (the same label generation would give, at a fraction of its cost)
    direct = forced_answers(teacher, tok, [r[2] for r in comp], [" " + edits[r[0]].target_new for r in comp]) \
        if shortcut else [False] * len(comp)
    for (i, j, _), ok in zip(comp, direct, strict=True):
        if ok:
            labels[i][j] = " " + edits[i].target_new
    comp = [r for r, ok in zip(comp, direct, strict=True) if not ok]
    longest = max((len(tok(edits[r[0]].target_completion, add_special_tokens=False)["input_ids"]) for r in comp),
                  default=4)
    missed = 0
    for rows, n_tok in ((comp, longest + 3), (chat, chat_tokens)):
        if not rows:
            continue
        answers = greedy(teacher, tok, [r[2] for r in rows], n_tok, progress=progress, desc="teacher (fast path)",
                         special=False)
        for (i, j, _), ans in zip(rows, answers, strict=True):
            e, f = edits[i], forms[i][j]
            got = (ans.strip() or None) if f.chat else cut_after(ans.split("\n")[0], e.target_new)
            if got is None or not carries(got, e.target_new):
                missed += 1
                continue
            labels[i][j] = got if f.chat else (got if got.startswith(" ") else " " + got.lstrip())
    return labels, missed


def forced_answers(model: Any, tok: Any, prompts: Sequence[str], answers: Sequence[str], batch: int = 32) -> list[bool]:
    """Whether ``model``'s greedy continuation of each prompt starts with its answer's tokens (one
    teacher-forced forward pass per batch, no decoding). Prompts are tokenized without special tokens."""
    import torch

    from kem.consolidation.shared.prompts import Row, pad, pad_id

    out: list[bool] = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for s in range(0, len(prompts), batch):
            ps = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[s:s + batch]]
            ans = [tok(a, add_special_tokens=False)["input_ids"] for a in answers[s:s + batch]]
            ids, mask = pad([Row(p + a, 0, [], r) for r, (p, a) in enumerate(zip(ps, ans, strict=True))],
                            pad_id(tok), device)
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu()
            for r, (p, a) in enumerate(zip(ps, ans, strict=True)):
                out.append(bool(a) and pred[r, len(p) - 1 : len(p) + len(a) - 1].tolist() == a)
    return out


def _fallback(e: Edit, f: Form) -> str:
    return e.fact if f.chat else " " + e.target_new


# ---- the retain side -------------------------------------------------------------------------------------
def retain_pool() -> list[dict[str, Any]]:
    """The shipped unrelated facts (``kem/data/retain_pool.json``): ``subject`` and ``template``."""
    text = resources.files("kem").joinpath("data/retain_pool.json").read_text(encoding="utf-8")
    return list(json.loads(text)["facts"])


_WORD = re.compile(r"[a-z]+")


def _words(template: str) -> set[str]:
    return set(_WORD.findall(template.lower())) - {"the", "of", "a", "an", "is", "was", "in", "by", "to", "and"}


def relation_key(template: str) -> str:
    """A coarse relation key: the question the template asks (else its words)."""
    q = question(template)
    return q if q is not None else " ".join(sorted(_words(template)))


def retain_prompts(edits: Sequence[Edit], pool: Sequence[dict[str, Any]], *, same_relation: int, random_n: int,
                   same_subject: int, chat: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(completion prompts, chat questions)`` for the retain set: facts of other subjects near each
    edit's relation, random facts, other relations of each edited subject, chat questions. Nothing that
    mentions an edited subject in another edit's relation, nothing in an edit's own relation about its
    subject."""
    rng = random.Random(seed)
    subjects = {e.subject.casefold() for e in edits}
    usable = [f for f in pool if f["subject"].casefold() not in subjects
              and not any(s in f["subject"].casefold() for s in subjects)]
    templates = sorted({f["template"] for f in pool})
    rel_of = {t: relation_key(t) for t in templates}  # once: the rules are regexes
    by_rel: dict[str, list[dict[str, Any]]] = {}
    for f in usable:
        by_rel.setdefault(rel_of[f["template"]], []).append(f)
    edited_rel = {(e.subject.casefold(), relation_key(e.prompt)) for e in edits}
    comp: list[str] = []
    chats: list[str] = []
    seen: set[str] = set()

    def add(text: str, into: list[str]) -> None:
        if text not in seen:
            seen.add(text)
            into.append(text)

    for e in edits:
        rel = relation_key(e.prompt)
        near = list(by_rel.get(rel, []))
        if len(near) < same_relation:  # few of that relation: the most word-similar templates
            w = _words(e.prompt)
            near += sorted(usable, key=lambda f: -len(w & _words(f["template"])))[: same_relation * 4]
        for f in rng.sample(near, min(same_relation, len(near))):
            add(f["template"].replace("{}", f["subject"], 1), comp)
        for f in rng.sample(usable, min(random_n, len(usable))):
            add(f["template"].replace("{}", f["subject"], 1), comp)
        own = {" ".join(a.lower().split()) for a in alt_clozes(e.prompt)}
        others = [t for t in templates if rel_of[t] != rel and " ".join(t.lower().split()) not in own
                  and (e.subject.casefold(), rel_of[t]) not in edited_rel]
        for t in rng.sample(others, min(same_subject, len(others))):
            add(t.replace("{}", e.subject, 1), comp)
        asked = 0
        for f in rng.sample(usable, min(chat * 4, len(usable))):
            q = question(f["template"])
            if q is not None and asked < chat:
                before = len(chats)
                add(q.replace("{}", f["subject"], 1), chats)
                asked += len(chats) - before
    return comp, chats


def parent_labels(model: Any, tok: Any, comp: Sequence[str], chats: Sequence[str], retain_tokens: int,
                  chat_tokens: int, progress: bool = False) -> tuple[list[str], list[str]]:
    """The parent's greedy continuations of the retain prompts (completions cut at a newline)."""
    from kem.consolidation.judge import greedy

    a = greedy(model, tok, list(comp), retain_tokens, progress=progress, desc="retain (parent)", special=False)
    c = greedy(model, tok, [chat_text(tok, q) for q in chats], chat_tokens, progress=progress,
               desc="retain chat (parent)", special=False) if chats else []
    return [x.split("\n")[0] for x in a], [x.strip() for x in c]
