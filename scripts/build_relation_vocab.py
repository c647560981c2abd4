"""Build kem/data/relation_templates.json: relation templates kem recognises, each with its Wikidata id.

Source: the CounterFact **train** split only (``../shared/data/counterfact/counterfact-train.json``) with
its per-record relation labels (``bench/data/counterfact_record_relations.json``, "train"). A template
enters the vocabulary when at least ``--purity`` of its train records carry one relation; the others
("{} is located in", used for countries, continents and regions alike) are kept under "ambiguous" with
their relations, and "values" counts each relation's answers (old and new), so an ambiguous template
is read by its answer ("Asia": a continent).

    python scripts/build_relation_vocab.py [--data ../shared/data] [--purity 0.9] [--min-records 5]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
from pathlib import Path

from kem.relations import normalise_template

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--labels", type=Path, default=ROOT / "bench" / "data" / "counterfact_record_relations.json")
    ap.add_argument("--purity", type=float, default=0.9)
    ap.add_argument("--min-records", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "kem" / "data" / "relation_templates.json")
    a = ap.parse_args()
    src = a.data / "counterfact" / "counterfact-train.json"
    raw = src.read_bytes()
    records = json.loads(raw)
    labels = json.loads(a.labels.read_text())["train"]
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    values: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in records:
        template = r["prompt"].replace(r["subject"], "{}", 1)
        rel = labels[str(r["case_id"])]
        counts[normalise_template(template)][rel] += 1
        for v in (r["ground_truth"], r["target_new"]):  # the kind of answer each relation has
            values[rel][v.casefold()] += 1
    vocab, left_out = {}, {}
    for t, c in sorted(counts.items()):
        rel, n = c.most_common(1)[0]
        total = sum(c.values())
        if total >= a.min_records and n / total >= a.purity:
            vocab[t] = rel
        else:
            left_out[t] = dict(c)
    out = {"_about": "Relation templates (normalised by kem.relations.normalise_template) -> Wikidata relation id, "
                     "from the CounterFact train split's records (scripts/build_relation_vocab.py); templates used "
                     f"for several relations (purity < {a.purity}) are left out and matched as themselves.",
           "source_sha256": hashlib.sha256(raw).hexdigest(), "templates": vocab, "ambiguous": left_out,
           "values": {rel: dict(sorted(c.items())) for rel, c in sorted(values.items())}}
    a.out.write_text(json.dumps(out, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"{len(vocab)} templates, {len(set(vocab.values()))} relations; {len(left_out)} left out -> {a.out}")


if __name__ == "__main__":
    main()
