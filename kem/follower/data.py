"""The edit-follower's training set, built from the CounterFact **train** split in kem's own formats.

Every example is rendered with the functions that serve requests (:func:`kem.compose.follower_completion`,
:func:`kem.compose.follower_chat` through the model's chat template), so the adapter learns exactly
what it will read. Per record (see :func:`build_examples`):

- ``reliability``: the fact's own prompt, the fact among 0-2 distractor facts, answer ``" target"``;
- ``paraphrase``: the record's rephrased prompt;
- ``question``: a question form of the relation (:mod:`kem.follower.questions`), as a completion
  and as a chat turn answered with the fact sentence;
- ``qa-fact``: the fact itself phrased as a question + answer (as ZsRE-style edits render);
- ``retain``: facts about *other* subjects in front of this record's neighbourhood prompt (or a
  question), labelled with the base model's own answer without facts, so the adapter never parrots a
  fact that does not answer the request;
- records whose old answer the base model gives confidently get one more paraphrase/question example
  (facts that contradict strong beliefs are the hard ones).

Nothing here imports torch: the base model's answers come in through a callback.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kem.compose import follower_chat, follower_completion
from kem.edit import fact_sentence
from kem.errors import DatasetFormatError
from kem.follower.questions import question_for

#: The split the follower may be trained on; the edit split, ZsRE and MQuAKE are for evaluation only.
TRAIN_FILE = "counterfact/counterfact-train.json"

#: System prompts an operator might already send (a few chat examples carry one before kem's facts).
OPERATOR_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are kem's demo assistant.",
)

#: base_answers(prompts, chat, max_new_tokens) -> the base model's greedy answers, no facts given.
BaseAnswers = Callable[[Sequence[str], bool, int], list[str]]


@dataclass(frozen=True)
class Record:
    """One CounterFact train record (flat EasyEdit format)."""

    case_id: int
    subject: str
    prompt: str  # the rendered prompt, subject filled in
    template: str  # the prompt with ``{}`` for the subject
    target_new: str
    target_true: str
    rephrase: str | None
    locality: str | None

    @property
    def fact(self) -> str:
        return fact_sentence(self.prompt, self.target_new)

    def holds_old(self, answer: str) -> bool:
        """Whether the base model's ``answer`` to the prompt gives the *old* object (a strongly-held fact)."""
        old = self.target_true.lower()
        return answer.strip().lower().startswith(old[: max(3, len(old) // 2)])

    def question(self) -> str | None:
        q = question_for(self.template)
        return q.replace("{}", self.subject) if q else None


@dataclass(frozen=True)
class Example:
    """One training example: the exact text the model reads and the answer it must give.

    Attributes:
        kind: ``reliability`` | ``paraphrase`` | ``question`` | ``qa-fact`` | ``retain``.
        chat: Whether ``messages`` go through the chat template (``text`` is then None until rendered).
        text: The completion request (for ``chat`` False).
        messages: The chat request (for ``chat`` True).
        answer: The answer text (for chat, the assistant message's content).
        case_id: The CounterFact record it comes from.
    """

    kind: str
    chat: bool
    answer: str
    case_id: int
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chat": self.chat, "case_id": self.case_id, "text": self.text,
                "messages": [list(m) for m in self.messages] if self.messages else None, "answer": self.answer}


def load_records(path: str | Path) -> list[Record]:
    """Read a CounterFact file through :func:`kem.datasets.read_cases` (the one dataset reader).

    Raises:
        DatasetFormatError: naming the record and field of the first invalid record.
    """
    from kem.datasets import read_cases

    out = []
    for c in read_cases(path, fmt="counterfact").check().items:
        e = c.edits[0]
        out.append(Record(int(c.case_id.split(":", 1)[1]), e.subject, e.rendered_prompt, e.prompt, c.target_new,
                          c.target_true or "", c.generalization[0].text if c.generalization else None,
                          c.locality[0].text if c.locality else None))
    return out


#: Evaluation files (under the data folder) whose texts, subjects and case ids training must never see.
EVAL_FILES = ("counterfact/counterfact-edit.json", "zsre/zsre_mend_eval_portability_gpt4.json",
              "mquake/MQuAKE-hard.json")
_WS = re.compile(r"\s+")
_WORDS = re.compile(r"\w+", re.UNICODE)


def norm_text(text: str) -> str:
    """Case-folded, whitespace collapsed: how training and evaluation texts are compared."""
    return _WS.sub(" ", text).strip().casefold()


def _eval_file(data_dir: str | Path, rel: str) -> Any:
    f = Path(data_dir) / rel
    if not f.is_file():
        raise DatasetFormatError(
            f"the evaluation file {f} is missing: training checks its data against every evaluation set "
            f"({', '.join(EVAL_FILES)}) and refuses to run without them (pass the data folder that holds them)")
    return json.loads(f.read_text(encoding="utf-8"))


def eval_subjects(data_dir: str | Path) -> tuple[set[str], set[int]]:
    """Subjects (case-folded) and CounterFact case ids of the evaluation sets under ``data_dir``.

    Raises:
        DatasetFormatError: an evaluation file is missing (training must not run unchecked).
    """
    subjects: set[str] = set()
    ids: set[int] = set()
    for rel in EVAL_FILES:
        for r in _eval_file(data_dir, rel):
            if not isinstance(r, dict):
                continue
            if isinstance(r.get("subject"), str):
                subjects.add(r["subject"].strip().casefold())
            for rw in r.get("requested_rewrite") or ():
                if isinstance(rw, dict) and isinstance(rw.get("subject"), str):
                    subjects.add(rw["subject"].strip().casefold())
            if rel.startswith("counterfact/") and isinstance(r.get("case_id"), int):
                ids.add(r["case_id"])
    return subjects, ids


def eval_texts(data_dir: str | Path) -> set[str]:
    """Every prompt-like text of the evaluation sets (:func:`norm_text`): CounterFact edit-split prompts,
    paraphrases and neighbourhood prompts; ZsRE questions, paraphrases, locality questions and
    portability questions; MQuAKE questions, clozes and rewrite prompts."""
    out: set[str] = set()

    def add(v: Any) -> None:
        if isinstance(v, str) and v.strip():
            out.add(norm_text(v.removeprefix("nq question: ")))

    for r in _eval_file(data_dir, EVAL_FILES[0]):
        for k in ("prompt", "rephrase_prompt", "locality_prompt"):
            add(r.get(k))
    for r in _eval_file(data_dir, EVAL_FILES[1]):
        for k in ("src", "rephrase", "loc"):
            add(r.get(k))
        port = r.get("portability") or {}
        add(port.get("New Question") if isinstance(port, dict) else None)
    for r in _eval_file(data_dir, EVAL_FILES[2]):
        for q in r.get("questions") or ():
            add(q)
        for rw in r.get("requested_rewrite") or ():
            if isinstance(rw, dict) and isinstance(rw.get("prompt"), str) and isinstance(rw.get("subject"), str):
                add(rw["prompt"].replace("{}", rw["subject"]))
                add(rw.get("question"))
        for hop in (r.get("single_hops") or []) + (r.get("new_single_hops") or []):
            if isinstance(hop, dict):
                add(hop.get("question"))
                add(hop.get("cloze"))
    return out


def names_a_subject(text: str, subjects: set[str], longest: int = 10) -> str | None:
    """The first evaluation subject ``text`` names as whole words (case-folded; ``subjects`` given as
    their words joined by single spaces), or None."""
    words = _WORDS.findall(text.casefold())
    for n in range(min(longest, len(words)), 0, -1):
        for i in range(len(words) - n + 1):
            phrase = " ".join(words[i:i + n])
            if phrase in subjects:
                return phrase
    return None


def overlap(record: Record, subjects: set[str], ids: set[int], texts: set[str]) -> str | None:
    """Why ``record`` touches evaluation data (a reason), or None when it does not."""
    if record.case_id in ids:
        return f"case id {record.case_id} is in the CounterFact edit split"
    for name, t in (("prompt", record.prompt), ("paraphrase", record.rephrase), ("neighbourhood prompt", record.locality)):
        if t is None:
            continue
        if norm_text(t) in texts:
            return f"its {name} {t!r} is an evaluation text"
        hit = names_a_subject(t, subjects)
        if hit is not None:
            return f"its {name} {t!r} names the evaluation subject {hit!r}"
    return None


def without_eval_overlap(records: Sequence[Record], data_dir: str | Path) -> list[Record]:
    """``records`` minus those that touch an evaluation set under ``data_dir`` (:func:`overlap`: a case id,
    a prompt, paraphrase or neighbourhood prompt that is an evaluation text, or one that names an
    evaluation subject).

    Raises:
        DatasetFormatError: an evaluation file is missing.
    """
    subjects, ids = eval_subjects(data_dir)
    names = {" ".join(_WORDS.findall(s)) for s in subjects}  # "Jean-Pierre Roy" as text words: "jean pierre roy"
    names = {s for s in names if len(s) >= 3}  # "of", "it": not names
    texts = eval_texts(data_dir)
    return [r for r in records if overlap(r, names, ids, texts) is None]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _msgs(messages: Sequence[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(m["role"]), str(m["content"])) for m in messages)


def build_examples(records: Sequence[Record], base_answers: BaseAnswers, *, seed: int = 0,
                   max_distractors: int = 2) -> list[Example]:
    """The training examples for ``records`` (see the module docstring for the kinds).

    Args:
        records: CounterFact **train** records.
        base_answers: The base model's greedy answers without facts (labels the retain examples and
            finds the strongly-held facts).
        seed: Sampling seed (which distractors, which forms).
        max_distractors: Up to this many unrelated facts beside the relevant one.
    """
    rng = random.Random(seed)
    recs = list(records)
    if len(recs) < 2:
        raise DatasetFormatError("the edit-follower needs at least 2 training records", field="data")

    def distractors(r: Record, k: int) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            o = recs[rng.randrange(len(recs))]
            if o.subject != r.subject and o.fact not in out:
                out.append(o.fact)
        return out

    def facts_with(r: Record, fact: str) -> list[str]:
        fs = distractors(r, rng.randint(0, max_distractors))
        fs.insert(rng.randint(0, len(fs)), fact)
        # follower_* put the first fact nearest the prompt, as the scope ranking does: mostly the relevant one
        if rng.random() < 0.7:
            fs.remove(fact)
            fs.insert(0, fact)
        return fs

    # the base model's own answers: old facts it holds strongly, and labels for the retain examples
    own = base_answers([r.prompt for r in recs], False, 4)
    loc_recs = [r for r in recs if r.locality]
    loc_answers = dict(zip([r.case_id for r in loc_recs],
                           base_answers([r.locality or "" for r in loc_recs], False, 6), strict=True))
    chat_retain = [r for r in recs if r.question() and rng.random() < 0.15]
    others = {r.case_id: recs[(i * 7919 + 13) % len(recs)] for i, r in enumerate(chat_retain)}
    chat_retain = [r for r in chat_retain if others[r.case_id].subject != r.subject]
    retain_qs = [r.question() or "" for r in chat_retain]
    chat_answers = dict(zip([r.case_id for r in chat_retain], base_answers(retain_qs, True, 24), strict=True))

    ex: list[Example] = []

    def comp(kind: str, r: Record, fact: str, prompt: str, answer: str) -> None:
        ex.append(Example(kind, False, answer, r.case_id, text=follower_completion(prompt, facts_with(r, fact))))

    def chat(kind: str, r: Record, fact: str, question: str, answer: str) -> None:
        turns: list[dict[str, Any]] = [{"role": "user", "content": question}]
        if rng.random() < 0.15:  # an operator's own system prompt comes first
            turns.insert(0, {"role": "system", "content": rng.choice(OPERATOR_PROMPTS)})
        msgs = follower_chat(turns, facts_with(r, fact))
        ex.append(Example(kind, True, answer, r.case_id, messages=_msgs(msgs)))

    for r, mine in zip(recs, own, strict=True):
        new = " " + r.target_new
        q = r.question()
        strong = r.holds_old(mine)
        if rng.random() < 0.6:
            comp("reliability", r, r.fact, r.prompt, new)
        if r.rephrase:
            comp("paraphrase", r, r.fact, r.rephrase, new)
        if q and rng.random() < 0.45:
            comp("question", r, r.fact, q, new)
        if q and rng.random() < 0.5:
            chat("question", r, r.fact, q, r.fact)
        elif rng.random() < 0.25:
            chat("reliability", r, r.fact, r.rephrase or r.prompt, f"{r.rephrase or r.prompt} {r.target_new}.")
        if q and rng.random() < 0.2:  # the fact given as a question and its answer (ZsRE-style edits)
            qa = f"{q} {r.target_new}."
            asked = rng.choice([q, q, r.rephrase or r.prompt, r.prompt])
            if rng.random() < 0.5:
                comp("qa-fact", r, qa, asked, new)
            else:
                chat("qa-fact", r, qa, asked, f"{r.target_new}." if asked == q else f"{asked} {r.target_new}.")
        if strong and (r.rephrase or q):  # a strongly-held fact replaced: one more phrasing
            if q and (not r.rephrase or rng.random() < 0.5):
                chat("question", r, r.fact, q, r.fact)
            else:
                comp("paraphrase", r, r.fact, r.rephrase or r.prompt, new)
        ans = loc_answers.get(r.case_id)
        if r.locality and ans and ans.strip() and rng.random() < 0.8:  # the fact must not leak to a neighbour
            comp("retain", r, r.fact, r.locality, ans)
        if r.case_id in chat_answers and chat_answers[r.case_id].strip():
            o = others[r.case_id]
            chat("retain", r, o.fact, r.question() or "", chat_answers[r.case_id])
    rng.shuffle(ex)
    return ex


def strongly_held(records: Sequence[Record], base_answers: BaseAnswers) -> list[Record]:
    """The records whose *old* answer the base model gives unprompted (facts it holds strongly)."""
    own = base_answers([r.prompt for r in records], False, 4)
    return [r for r, a in zip(records, own, strict=True) if r.holds_old(a)]
