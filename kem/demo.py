"""``kem demo``: a few CounterFact edits and strongly-held facts replaced, in a temporary store; answers
before and after (with the edit-follower kem ships for the default model, in-scope requests only)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from kem.edit import Edit
from kem.settings import Settings

UNRELATED = [
    "The capital of France is",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
]

#: Facts the model holds strongly (it answers them right unprompted), replaced; asked as a paraphrase
#: and as a question, neither of which is stored with the edit.
STRONG = [
    ({"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"},
     ["The Eiffel Tower can be found in the city of", "Where is the Eiffel Tower?"]),
    ({"subject": "Microsoft", "prompt": "{} was founded by", "target_new": "Elon Musk"},
     ["Who founded Microsoft?"]),
]


def demo_records() -> list[dict[str, Any]]:
    data = json.loads(resources.files("kem").joinpath("data/counterfact_demo.json").read_text(encoding="utf-8"))
    return list(data["records"])


def run_demo(max_new_tokens: int = 12, progress: bool = True, settings: Settings | None = None,
             home: str | Path | None = None) -> list[dict[str, Any]]:
    """Returns one row per question: kind, question, unedited and edited answers, applied edits.

    Args:
        home: Keep the demo's store there (SQLite under ``home``; its edits are in the default, shared
            namespace, so ``kem consolidate --home HOME`` writes them into the weights). Default: a
            temporary folder, removed afterwards. Edits already there are not added twice.
    """
    from kem.datasets import counterfact_edit
    from kem.editor import KnowledgeEditor

    settings = (settings or Settings()).model_copy(update={"store": None})  # a temporary SQLite, never KEM_STORE
    records = demo_records()
    questions: list[tuple[str, str, bool]] = []  # (kind, text, chat?)
    for r in records:
        questions.append(("edited", r["prompt"], False))
        questions.append(("paraphrase", r["rephrase_prompt"], False))
    questions.append(("edited (chat)", f"What is the mother tongue of {records[0]['subject']}?", True))
    for _, asks in STRONG:
        questions.extend(("strongly-held", q, q.endswith("?")) for q in asks)
    questions.append(("unrelated", records[0]["locality_prompt"], False))
    questions.extend(("unrelated", q, q.endswith("?")) for q in UNRELATED)

    with contextlib.ExitStack() as stack:
        where = Path(home) if home is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kem-demo-")))
        with KnowledgeEditor.open(where, settings=settings) as ke:
            have = {(e.subject, e.prompt) for e in ke.store.list(settings.namespace)}
            new = [counterfact_edit(r, n, "demo") for n, r in enumerate(records)] + [
                Edit(**{**e, "source": "demo"}) for e, _ in STRONG]
            ke.add_many([e for e in new if (e.subject, e.prompt) not in have])
            rows = []
            from tqdm.auto import tqdm

            for kind, q, chat in tqdm(questions, desc="asking", disable=not progress):
                ask = ke.chat if chat else ke.generate
                before = ask(q, max_new_tokens=max_new_tokens, use_edits=False)
                after = ask(q, max_new_tokens=max_new_tokens)
                rows.append({
                    "kind": kind, "question": q, "unedited": before.text.strip(), "edited": after.text.strip(),
                    "edits": [s.as_dict() for s in after.edits],
                })
    return rows
