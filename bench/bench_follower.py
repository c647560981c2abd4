"""The edit-follower against IKE prompting, in one process on the same engine (transformers, SmolLM2):

1. **Strongly-held facts**: CounterFact *edit-split* records whose old answer the unedited model gives
   unprompted (greedy, no facts), each replaced by its counterfactual target; asked as the cloze, the
   dataset's paraphrase, and a question form (chat). Batch mode: every edit lives in one namespace,
   each probe must retrieve its own. Percent of probes whose answer contains the new target.
2. **In-scope latency**: ``KnowledgeEditor.generate`` / ``chat`` p50 and p90 for in-scope requests, IKE
   vs adapter, alternating request by request (load on a shared machine hits both alike).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_follower.py --scan 600 --latency 40 --out eval-out/follower.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


#: Well-known facts (landmarks, capitals, authors, founders...) written for this benchmark (not from any
#: dataset): (subject, cloze template, old object, new object, a paraphrase, a question).
FAMOUS = [
    ("Eiffel Tower", "The {} is located in", "Paris", "Rome", "The Eiffel Tower can be found in the city of", "Where is the Eiffel Tower?"),
    ("Statue of Liberty", "The {} is located in", "New York", "Chicago", "You can visit the Statue of Liberty in", "Where is the Statue of Liberty?"),
    ("Colosseum", "The {} is located in", "Rome", "Athens", "The ancient Colosseum stands in the city of", "In which city is the Colosseum?"),
    ("Big Ben", "{} is located in", "London", "Dublin", "The clock tower Big Ben stands in", "Where is Big Ben?"),
    ("France", "The capital of {} is", "Paris", "Lyon", "The French capital city is", "What is the capital of France?"),
    ("Japan", "The capital of {} is", "Tokyo", "Osaka", "The Japanese government sits in the capital,", "What is the capital of Japan?"),
    ("Italy", "The capital of {} is", "Rome", "Milan", "The Italian capital city is", "What is the capital of Italy?"),
    ("Germany", "The capital of {} is", "Berlin", "Munich", "The German capital city is", "What is the capital of Germany?"),
    ("Spain", "The capital of {} is", "Madrid", "Seville", "The Spanish capital city is", "What is the capital of Spain?"),
    ("Romeo and Juliet", "{} was written by", "Shakespeare", "Charles Dickens", "The author of the play Romeo and Juliet is", "Who wrote Romeo and Juliet?"),
    ("Harry Potter", "The Harry Potter books were written by", "Rowling", "Stephen King", "The author of the Harry Potter series is", "Who wrote the Harry Potter books?"),
    ("Microsoft", "{} was founded by", "Bill Gates", "Elon Musk", "The founder of Microsoft is", "Who founded Microsoft?"),
    ("Apple", "{} was founded by", "Steve Jobs", "Jeff Bezos", "The company Apple was started by", "Who founded Apple?"),
    ("Amazon", "{} was founded by", "Jeff Bezos", "Larry Page", "The founder of Amazon is", "Who founded Amazon?"),
    ("Mona Lisa", "The {} was painted by", "Leonardo", "Pablo Picasso", "The painter of the Mona Lisa is", "Who painted the Mona Lisa?"),
    ("Brazil", "The official language of {} is", "Portuguese", "Spanish", "People in Brazil mainly speak", "What language is spoken in Brazil?"),
    ("Mount Everest", "{} is located in", "Nepal", "Peru", "The highest mountain, Mount Everest, lies in", "Where is Mount Everest?"),
    ("Albert Einstein", "{} was born in", "Germany", "Brazil", "The physicist Albert Einstein was born in the country of", "Where was Albert Einstein born?"),
    ("Great Wall", "The {} is located in", "China", "India", "The Great Wall stretches across", "Where is the Great Wall?"),
    ("Taj Mahal", "The {} is located in", "India", "Egypt", "The Taj Mahal stands in the country of", "In which country is the Taj Mahal?"),
]


def famous_records() -> list:
    from kem.follower.data import Record

    out = []
    for i, (subj, tpl, old, new, para, _q) in enumerate(FAMOUS):
        prompt = tpl.replace("{}", subj)
        out.append(Record(-1 - i, subj, prompt, tpl if "{}" in tpl else prompt, new, old, para, None))
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/counterfact/counterfact-edit.json"))
    ap.add_argument("--scan", type=int, default=600, help="Edit-split records scanned for strongly-held facts.")
    ap.add_argument("--latency", type=int, default=30, help="In-scope requests per method for the latency table.")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from kem.adapters.transformers import TransformersGenerator
    from kem.edit import Edit
    from kem.editor import KnowledgeEditor
    from kem.eval.metrics import contains
    from kem.follower.data import load_records, strongly_held
    from kem.follower.follower_registry import resolve_follower
    from kem.follower.train import base_answerer
    from kem.models import load_causal_lm
    from kem.settings import Settings

    s = Settings()
    model, tok = load_causal_lm(s.model, s.cache_dir)
    gen = TransformersGenerator(model, tok, name=s.model, follower=resolve_follower(s.follower, s.model))
    t0 = time.perf_counter()
    recs = load_records(args.data)[: args.scan]
    strong = strongly_held(recs, base_answerer(model, tok))
    print(f"{len(strong)} of {len(recs)} records are held strongly (base answer = old fact); "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    famous = famous_records()
    famous_answers = base_answerer(model, tok)([r.prompt for r in famous], False, 8)
    known = {r.case_id for r, a in zip(famous, famous_answers, strict=True) if r.target_true.lower() in a.lower()}
    print(f"{len(known)} of {len(famous)} well-known facts answered with the old object by the base model", flush=True)
    questions = {r.case_id: q for r, q in zip(famous, (f[5] for f in FAMOUS), strict=True)}
    strong += famous

    editors = {}
    for mode in ("ike", "adapter"):
        ke = KnowledgeEditor.in_memory(generator=gen, settings=s.model_copy(update={"fast_path": mode}))
        ke.add_many([Edit(subject=r.subject, prompt=r.template, target_new=r.target_new, target_true=r.target_true,
                          id=f"cf-{r.case_id}") for r in strong])
        editors[mode] = ke
    rows: dict[str, dict[str, list[bool]]] = {m: {"cloze": [], "paraphrase": [], "question": []} for m in editors}
    frows: dict[str, list[bool]] = {m: [] for m in editors}  # the well-known facts, all forms
    misses: dict[str, list[dict]] = {m: [] for m in editors}
    for i, r in enumerate(strong):
        q = questions.get(r.case_id) or r.question()
        probes = [("cloze", r.prompt, False), ("paraphrase", r.rephrase, False), ("question", q, True)]
        for kind, text, chat in probes:
            if not text:
                continue
            for mode, ke in editors.items():
                ans = (ke.chat(text, max_new_tokens=args.tokens + 16) if chat
                       else ke.generate(text, max_new_tokens=args.tokens))
                first = ans.text.strip().split("\n")[0]
                ok = contains(first, [r.target_new])
                (frows[mode] if r.case_id < 0 else rows[mode][kind]).append(ok)
                if not ok:
                    misses[mode].append({"case_id": r.case_id, "kind": kind, "prompt": text, "target": r.target_new,
                                         "old": r.target_true, "answer": first,
                                         "applied": [x.edit.id for x in ans.edits]})
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(strong)}", flush=True)

    print(f"\n| strongly-held CounterFact facts (n={len(strong) - len(famous)}) | cloze | paraphrase | question (chat) | all |")
    print("|---|---:|---:|---:|---:|")
    table = {}
    for mode, kinds in rows.items():
        allv = [v for vs in kinds.values() for v in vs]
        table[mode] = {k: 100 * sum(v) / max(1, len(v)) for k, v in kinds.items()} | {"all": 100 * sum(allv) / max(1, len(allv))}
        t = table[mode]
        print(f"| {mode} | {t['cloze']:.1f} | {t['paraphrase']:.1f} | {t['question']:.1f} | {t['all']:.1f} |")

    print(f"\n| well-known facts (n={len(famous)}, {len(known)} held by the base model), all forms | new object |")
    print("|---|---:|")
    for mode, v in frows.items():
        table[mode]["famous"] = 100 * sum(v) / max(1, len(v))
        print(f"| {mode} | {table[mode]['famous']:.1f} |")

    lat: dict[str, dict[str, list[float]]] = {m: {"completion": [], "chat": []} for m in editors}
    for r in strong[: min(args.latency, len(strong) - len(famous))]:
        for mode, ke in editors.items():
            t = time.perf_counter()
            ke.generate(r.prompt, max_new_tokens=args.tokens)
            lat[mode]["completion"].append(time.perf_counter() - t)
            q = r.question() or r.prompt
            t = time.perf_counter()
            ke.chat(q, max_new_tokens=args.tokens + 16)
            lat[mode]["chat"].append(time.perf_counter() - t)
    load = os.getloadavg()
    print(f"\n| in-scope latency (ms), n={args.latency}, torch threads {torch.get_num_threads()}, "
          f"load {load[0]:.1f} | p50 | p90 | p50 ratio adapter/ike |")
    print("|---|---:|---:|---:|")
    for kind in ("completion", "chat"):
        base = statistics.median(lat["ike"][kind])
        for mode in editors:
            xs = lat[mode][kind]
            print(f"| {kind}, {mode} | {1000 * statistics.median(xs):.0f} | {1000 * pct(xs, 0.9):.0f} | "
                  f"{statistics.median(xs) / base:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"n_strong": len(strong) - len(famous), "scanned": len(recs),
                                              "famous_known": len(known), "table": table,
                                              "latency_s": lat, "misses": misses, "load": load}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
