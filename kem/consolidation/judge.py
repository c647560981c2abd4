"""What the consolidation job's judge step asks a model (:mod:`kem.consolidation.job`): greedy answers
(:func:`greedy`), every form of each edit (:func:`ask_forms`, scored by :func:`forms_summary`), the
held-out locality probes (:func:`default_probes`, :func:`select_probes`) and perplexity on held-out text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

from kem.edit import Edit


def default_probes() -> list[str]:
    """The shipped held-out locality prompts (``kem/data/locality_probes.json``)."""
    text = resources.files("kem").joinpath("data/locality_probes.json").read_text(encoding="utf-8")
    return list(json.loads(text)["prompts"])


def greedy(model: Any, tok: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
           progress: bool = False, desc: str = "generate", special: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), decoded without special tokens.
    ``special=False`` tokenizes the prompts without adding special tokens (text already rendered by a
    chat template)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out: list[str] = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
                chunk = list(prompts[i : i + batch_size])
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
                out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def carries(answer: str, edit: Edit) -> bool:
    """Whether a greedy answer states the edit's new target (case-insensitive containment)."""
    from kem.consolidation.forms import carries as states

    return states(answer, edit.target_new)


def ask_forms(model: Any, tok: Any, edits: Sequence[Edit], chat_tokens: int = 32,
              progress: bool = False) -> list[list[dict[str, Any]]]:
    """Ask ``model`` (no context) every form of each edit (:func:`kem.consolidation.forms.forms_for`):
    per edit, ``[{"kind", "text", "answer", "ok"}, ...]`` with ``ok`` when the greedy answer carries the
    target. Chat questions go through the tokenizer's chat template."""
    from kem.consolidation.forms import chat_text, forms_for

    forms = [forms_for(e) for e in edits]
    out: list[list[dict[str, Any]]] = [[{"kind": f.kind, "text": f.text, "answer": "", "ok": False} for f in fs]
                                       for fs in forms]
    if not edits:
        return out
    longest = max(len(tok(e.target_completion, add_special_tokens=False)["input_ids"]) for e in edits)
    comp = [(i, j, f.text) for i, fs in enumerate(forms) for j, f in enumerate(fs) if not f.chat]
    chat = [(i, j, chat_text(tok, f.text)) for i, fs in enumerate(forms) for j, f in enumerate(fs) if f.chat]
    for rows, n_tok, special, desc in ((comp, longest + 4, True, "edits (cloze, paraphrases)"),
                                       (chat, chat_tokens, False, "edits (chat questions)")):
        if not rows:
            continue
        answers = greedy(model, tok, [r[2] for r in rows], n_tok, progress=progress, desc=desc, special=special)
        for (i, j, _), a in zip(rows, answers, strict=True):
            out[i][j].update(answer=a, ok=carries(a, edits[i]))
    return out


def perplexity_texts() -> list[str]:
    """The held-out paragraphs of the perplexity gate (``kem/data/perplexity_text.json``, WikiText-2 valid)."""
    text = resources.files("kem").joinpath("data/perplexity_text.json").read_text(encoding="utf-8")
    return list(json.loads(text)["texts"])


def perplexity(model: Any, tok: Any, texts: Sequence[str] | None = None, max_tokens: int = 512) -> float:
    """Token-level perplexity of ``model`` on ``texts`` (default :func:`perplexity_texts`), each cut at
    ``max_tokens`` tokens."""
    import math

    import torch

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.inference_mode():
        for t in texts if texts is not None else perplexity_texts():
            ids = tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens].to(device)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


def select_probes(edits: Sequence[Edit], probes: Sequence[str] | None = None, max_probes: int = 100) -> list[str]:
    """Held-out prompts for the locality gate: ``probes`` (default :func:`default_probes`) then the
    edits' own locality probes, without duplicates or prompts that mention an edit's subject."""
    subjects = [e.subject.casefold() for e in edits]
    pool = list(probes if probes is not None else default_probes())
    pool += [p.prompt for e in edits for p in e.locality]
    out: list[str] = []
    for p in pool:
        if p not in out and not any(s in p.casefold() for s in subjects):
            out.append(p)
    return out[:max_probes]


def forms_summary(edits: Sequence[Edit], asked: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """Scores of :func:`ask_forms`'s answers: ``reliability`` (own clozes), ``paraphrase``, ``question``,
    ``generalization`` (paraphrases and questions together), and per kind how many edits missed it."""
    by: dict[str, list[bool]] = {"cloze": [], "paraphrase": [], "question": []}
    missed = {k: 0 for k in by}
    for fs in asked:
        for kind in by:
            oks = [f["ok"] for f in fs if f["kind"] == kind]
            by[kind] += oks
            missed[kind] += int(bool(oks) and not all(oks))
    other = by["paraphrase"] + by["question"]

    def frac(x: list[bool]) -> float:
        return sum(x) / len(x) if x else 1.0

    return {"reliability": frac(by["cloze"]), "paraphrase": frac(by["paraphrase"]), "question": frac(by["question"]),
            "generalization": frac(other), "forms": sum(len(v) for v in by.values()),
            "cloze_missed": missed["cloze"], "paraphrase_missed": missed["paraphrase"],
            "question_missed": missed["question"]}


def unchanged(after: Sequence[str], before: Sequence[str]) -> list[bool]:
    """Per probe: answered as by the parent (the locality gate's unit), ignoring surrounding whitespace."""
    return [a.strip() == b.strip() for a, b in zip(after, before, strict=True)]
