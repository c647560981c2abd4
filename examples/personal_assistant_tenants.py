"""Two users of one personal assistant, each with their OWN consolidated facts: one base model, one
engine (``kem serve``), and a LoRA adapter per user, queried with the ``openai`` client.

    .venv/bin/python examples/personal_assistant_tenants.py           # real consolidation (a few minutes on CPU)
    .venv/bin/python examples/personal_assistant_tenants.py --quick   # quick low-rank fact adapters (the test)

1. ``kem serve --keys`` starts with two API keys: ``sk-alice`` is bound to namespace ``alice``,
   ``sk-bob`` to ``bob``. Each user stores their facts through the edits API with their own key.
2. Before consolidation, the facts reach the answers in context (the fast path).
3. ``kem consolidate --namespace alice`` (then ``bob``) writes each user's facts into a LoRA adapter of
   their own (``models/tenants/<user>/v1/adapter``, a few hundred KB) instead of the shared weights.
   The running server picks the new versions up at the next request (no restart): each user's
   requests now run with their own adapter, and the facts it holds leave the prompt.
4. The same question gets each user's own answer, and a user without an adapter gets the base model.

``--quick`` replaces step 3's consolidation by ``tests/fact_adapters.py`` (closed-form rank-n edits of
the last MLP layer, seconds instead of minutes), published the same way.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"alice": "sk-alice", "bob": "sk-bob", "carol": "sk-carol"}  # carol stores nothing
FACTS = {
    "alice": [{"subject": "my manager", "prompt": "The name of {} is", "target_new": "Priya Raman"},
              {"subject": "my gym", "prompt": "The opening hour of {} is", "target_new": "6 am"}],
    "bob": [{"subject": "my manager", "prompt": "The name of {} is", "target_new": "Tomás Silva"}],
}
QUESTION = "The name of my manager is"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    keys = home / "keys.txt"
    keys.write_text("".join(f"{key} {user}\n" for user, key in KEYS.items()))
    port = _port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "kem.server", "serve", "--home", str(home), "--keys", str(keys),
                             "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                            stdout=open(home / "server.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError((home / "server.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("kem serve did not come up")


def ask(url: str, user: str, prompt: str = QUESTION) -> tuple[str, list[str]]:
    """``(answer, edits applied in context)`` for ``user``'s completion request."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[user], max_retries=0, timeout=120)
    out = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0)
    return out.choices[0].text, [e["target_new"] for e in out.model_extra["kem"]["edits"]]


def consolidate(home: Path, user: str, quick: bool, edit_ids: list[str]) -> None:
    if not quick:
        subprocess.run([sys.executable, "-m", "kem", "consolidate", "--namespace", user, "--home", str(home),
                        "--method", "rome"], check=True, cwd=ROOT)
        return
    sys.path.insert(0, str(ROOT))
    from kem.models import load_causal_lm
    from kem.settings import Settings
    from tests.fact_adapters import fact_adapter, publish_tenant

    s = Settings()
    model, tok = load_causal_lm(s.model, s.cache_dir, device="cpu")
    facts = [(f["prompt"].replace("{}", f["subject"]), f["target_new"]) for f in FACTS[user]]
    folder = fact_adapter(model, tok, facts, home / "quick" / user)
    version = publish_tenant(home, user, folder, edit_ids)
    from kem.stores.sqlite import SQLiteStore  # what the job does after publishing: the edits are absorbed

    store = SQLiteStore(home / "edits.sqlite")
    try:
        store.mark_consolidated(edit_ids, f"{user}/{version}")
    finally:
        store.close()


def table(url: str, title: str) -> dict[str, tuple[str, list[str]]]:
    print(f"\n{title}")
    answers = {}
    for user in KEYS:
        text, applied = ask(url, user)
        answers[user] = (text, applied)
        print(f"  {user:>5}: {QUESTION}{text!r}   in context: {applied or 'nothing'}")
    return answers


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[str, list[str]]]]:
    """Run the example; ``{"before" | "after": {user: (answer, edits applied in context)}}``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quick fact adapters instead of kem consolidate")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        proc, url = start_server(home)
        try:
            ids: dict[str, list[str]] = {}
            for user, facts in FACTS.items():
                for fact in facts:
                    r = httpx.post(url + "/v1/edits", json=fact, timeout=60,
                                   headers={"authorization": f"Bearer {KEYS[user]}"})
                    r.raise_for_status()
                    ids.setdefault(user, []).append(r.json()["id"])
            before = table(url, "before consolidation (facts applied in context):")
            for user in FACTS:
                consolidate(home, user, args.quick, ids[user])
            after = table(url, "after kem consolidate --namespace (each user's own adapter, same server):")
            for user in FACTS:
                size = sum(f.stat().st_size for f in (home / "models" / "tenants" / user / "v1" / "adapter").iterdir())
                print(f"  {user}'s adapter: {size / 1024:.0f} KiB")
        finally:
            proc.terminate()
            proc.wait(30)
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
