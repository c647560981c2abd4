"""``kem demo``: a few CounterFact edits and strongly-held facts replaced, in a temporary store; answers
before and after (with the edit-follower kem ships for the default model, in-scope requests only)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from datetime import UTC, datetime, timedelta
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


#: One fact changed twice (a CEO replaced, then replaced again), each value valid from a date; asked now
#: and "as of" a year ago, when the middle value held.
CEOS = ["Alice Martin", "Bob Okafor", "Carla Reyes"]


def timeline(now: datetime) -> list[Edit]:
    """The CEO of Kem Corporation: from January 1st six years ago, three years ago and this year."""
    starts = [datetime(now.year - 6, 1, 1, tzinfo=UTC), datetime(now.year - 3, 1, 1, tzinfo=UTC),
              datetime(now.year, 1, 1, tzinfo=UTC)]
    return [Edit(subject="Kem Corporation", prompt="The CEO of {} is", target_new=name, relation="P169",
                 valid_from=start, source="demo", evidence=f"demo: appointed {start:%Y-%m-%d}")
            for name, start in zip(CEOS, starts, strict=True)]


#: A chain of two edits: the question names neither the CEO nor her country; kem follows the CEO edit's
#: new object (Carla Reyes, the current CEO) to the edit about her.
CHAIN = Edit(subject="Carla Reyes", prompt="{} is a citizen of", target_new="Portugal", relation="P27", source="demo")
CHAIN_QUESTION = "What is the country of citizenship of the CEO of Kem Corporation?"


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
    now = datetime.now(UTC)
    last_year = now - timedelta(days=365)
    questions: list[tuple[str, str, bool] | tuple[str, str, bool, datetime]] = []  # (kind, text, chat?[, as of])
    for r in records:
        questions.append(("edited", r["prompt"], False))
        questions.append(("paraphrase", r["rephrase_prompt"], False))
    questions.append(("edited (chat)", f"What is the mother tongue of {records[0]['subject']}?", True))
    for _, asks in STRONG:
        questions.extend(("strongly-held", q, q.endswith("?")) for q in asks)
    questions.append(("changed twice (now)", "The CEO of Kem Corporation is", False))
    questions.append((f"changed twice (as of {last_year:%Y-%m-%d})", "The CEO of Kem Corporation is", False, last_year))
    questions.append(("2-hop chain", CHAIN_QUESTION, True))
    questions.append(("unrelated", records[0]["locality_prompt"], False))
    questions.extend(("unrelated", q, q.endswith("?")) for q in UNRELATED)

    with contextlib.ExitStack() as stack:
        where = Path(home) if home is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kem-demo-")))
        with KnowledgeEditor.open(where, settings=settings) as ke:
            have = {(e.subject, e.prompt) for e in ke.list(settings.namespace)}
            new = [counterfact_edit(r, n, "demo") for n, r in enumerate(records)] + [
                Edit(**{**e, "source": "demo"}) for e, _ in STRONG] + timeline(now) + [CHAIN]
            ke.add_many([e for e in new if (e.subject, e.prompt) not in have])
            rows = []
            from tqdm.auto import tqdm

            for kind, q, chat, *when in tqdm(questions, desc="asking", disable=not progress):
                ask = ke.chat if chat else ke.generate
                as_of = when[0] if when else None
                before = ask(q, max_new_tokens=max_new_tokens, use_edits=False)
                after = ask(q, max_new_tokens=max_new_tokens, as_of=as_of)
                rows.append({
                    "kind": kind, "question": q, "unedited": before.text.strip(), "edited": after.text.strip(),
                    "edits": [s.as_dict() for s in after.edits], "as_of": as_of.isoformat() if as_of else None,
                })
    return rows
