"""A personal assistant with one fact store per user: each user's edits live in their own namespace,
so one user's facts never leak into another's answers.

    .venv/bin/python examples/personal_assistant.py

Over HTTP the same separation comes from API keys: a keys file with one line per user
(``sk-alice alice``, ``sk-bob bob``) given to ``kem serve --keys FILE``; each user's client sends its
own key and gets only its own edits (see docs/serving.md).
"""

from __future__ import annotations

import tempfile

from kem import Edit, KnowledgeEditor

USERS = {
    "alice": [("my manager", "The name of {} is", "Priya Raman"),
              ("my gym", "The opening hour of {} is", "6 am")],
    "bob": [("my manager", "The name of {} is", "Tomás Silva")],
}


def main() -> None:
    with tempfile.TemporaryDirectory() as home, KnowledgeEditor.open(home) as ke:
        for user, facts in USERS.items():
            for subject, prompt, target in facts:
                ke.add(Edit(namespace=user, subject=subject, prompt=prompt, target_new=target, source=user))
        for user in ("alice", "bob", "carol"):
            ans = ke.generate("The name of my manager is", namespace=user, max_new_tokens=6)
            applied = [s.edit.target_new for s in ans.edits]
            print(f"{user:>5}: The name of my manager is{ans.text!r}  (edits applied: {applied or 'none'})")
            print(f"       facts stored: {[e.target_new for e in ke.list(namespace=user)]}")


if __name__ == "__main__":
    main()
