"""Build ``kem/data/retain_pool.json``: the unrelated facts ``distill`` keeps unchanged while it trains.

Source: the CounterFact **train** split only (``../shared/data/counterfact/counterfact-train.json``).
A record is dropped when its subject or case id appears in an evaluation set (CounterFact edit split,
ZsRE, MQuAKE: :func:`kem.follower.data.without_eval_overlap`), or when any of its texts (prompt,
rephrase, neighbourhood prompt) occurs in an evaluation file or in the consolidation gate's locality
probes (``kem/data/locality_probes.json``): those must stay held out. Only the record's own cloze
(subject + relation template) is kept; the answers are the served model's own, computed at job time.

    .venv/bin/python scripts/build_retain_pool.py [--data ../shared/data] [--n 3000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from kem.follower.data import EVAL_FILES, load_records, without_eval_overlap


def eval_texts(data_dir: Path) -> set[str]:
    """Every string value (case-folded, stripped) of the evaluation files, plus the gate's probes."""
    out: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, str):
            out.add(" ".join(x.casefold().split()))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for rel in EVAL_FILES:
        f = data_dir / rel
        if f.exists():
            walk(json.loads(f.read_text(encoding="utf-8")))
    probes = Path(__file__).resolve().parents[1] / "kem/data/locality_probes.json"
    walk(json.loads(probes.read_text(encoding="utf-8"))["prompts"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "kem/data/retain_pool.json"))
    a = ap.parse_args()
    data = Path(a.data)
    src = data / "counterfact/counterfact-train.json"
    records = load_records(src)
    kept = without_eval_overlap(records, data)
    banned = eval_texts(data)

    def clean(t: str | None) -> bool:
        return t is None or " ".join(t.casefold().split()) not in banned

    rows = []
    for r in kept:
        if not ("{}" in r.template and clean(r.prompt) and clean(r.rephrase) and clean(r.locality)):
            continue
        rows.append({"case_id": r.case_id, "subject": r.subject, "template": r.template})
    random.Random(a.seed).shuffle(rows)
    seen: set[str] = set()
    pool = []
    for row in rows:  # one cloze per subject
        if row["subject"].casefold() in seen:
            continue
        seen.add(row["subject"].casefold())
        pool.append(row)
        if len(pool) >= a.n:
            break
    doc = {
        "_about": "Unrelated facts kem's distill method keeps unchanged (retain set); answers come from the served "
                  "model at job time. Built by scripts/build_retain_pool.py from the CounterFact train split only; "
                  "no subject, case id or text of CounterFact edit, ZsRE, MQuAKE or the gate's locality probes.",
        "source": str(src.name),
        "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "records_read": len(records), "after_eval_overlap": len(kept), "kept": len(pool),
        "facts": pool,
    }
    head = json.dumps({k: v for k, v in doc.items() if k != "facts"}, ensure_ascii=False, indent=1)[:-2]
    rows = ",\n".join(json.dumps(f, ensure_ascii=False) for f in pool)
    Path(a.out).write_text(f'{head},\n "facts": [\n{rows}\n ]\n}}\n', encoding="utf-8")
    print(f"{len(pool)} facts -> {a.out} ({len(records)} read, {len(kept)} without eval subjects)")


if __name__ == "__main__":
    main()
