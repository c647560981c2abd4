"""What the weights alone answer after consolidation, method by method, beside the fast path.

For N CounterFact edit-split records (never seen by kem's training: the follower and distill's retain
pool use the train split only), each method computes its delta for all N edits at once (or in
``--sequential K`` jobs of N/K edits, each on the weights of the last), applied to the model, then the
weights alone, with no context, are asked (generation protocol, greedy):

- reliability: the record's own prompt; paraphrase: its held-out ``rephrase_prompt`` (never given to
  any method); question: the chat question of its relation (kem's question rules), the answer
  contains the new target;
- neighbourhood: the record's ``locality_prompt`` greedy answer (6 tokens) unchanged against the
  unedited model; probes: the same on the consolidation gate's held-out prompts;
- perplexity on held-out WikiText-2 paragraphs, relative to the unedited model;
- CPU seconds per edit (process time, both cores) and wall seconds.

The ``fast path`` row serves the same probes through kem's KnowledgeEditor (SQLite + FAISS + the
edit-follower) on the unedited weights: what the weights have to keep.

    .venv/bin/python bench/bench_weights_alone.py --n 50 --methods fast-path,distill,memit
    .venv/bin/python bench/bench_weights_alone.py --n 200 --sequential 4 --methods distill
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main() -> None:
    from kem.runtime import own_process

    own_process()
    import torch

    from kem.consolidation.context import EditContext
    from kem.consolidation.delta import apply_delta
    from kem.consolidation.forms import question as question_for
    from kem.consolidation.judge import default_probes, greedy, perplexity
    from kem.consolidation.method_registry import get_method
    from kem.datasets import read_cases
    from kem.follower.follower_registry import follower_for
    from kem.models import load_causal_lm
    from kem.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="which records (a seeded sample of the edit split)")
    ap.add_argument("--methods", default="fast-path,distill,memit")
    ap.add_argument("--sequential", type=int, default=1, help="jobs the N edits are split into, one after another")
    ap.add_argument("--hparams", "-H", action="append", default=[], help="METHOD:KEY=VALUE override")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", default=None, help="covariance corpus (default: the text kem ships; \"model\": sampled from the model; e.g. "
                    "../shared/data/wikitext-2/valid.txt with -H METHOD:mom2_samples=200 reuses the tests' statistics)")
    ap.add_argument("--json", help="also write the rows (and per-case answers) here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    settings = Settings()
    cases = read_cases(a.data, fmt="counterfact").check().items
    random.Random(a.seed).shuffle(cases)
    cases = cases[: a.n]
    edits = [c.edits[0] for c in cases]
    model, tok = load_causal_lm(settings.model, settings.cache_dir, device="cpu")
    probes = default_probes()
    rows, details = [], {}

    from kem.consolidation.forms import chat_text

    def chat(q: str) -> str:
        return chat_text(tok, q)

    questions = [question_for(e.prompt) for e in edits]
    q_idx = [i for i, q in enumerate(questions) if q]
    q_text = [questions[i].replace("{}", edits[i].subject, 1) for i in q_idx]
    para = [c.generalization[0].text if c.generalization else None for c in cases]
    p_idx = [i for i, p in enumerate(para) if p]
    loc = [c.locality[0].text if c.locality else None for c in cases]
    l_idx = [i for i, p in enumerate(loc) if p]

    def ask(m) -> dict:
        t = [greedy(m, tok, [e.rendered_prompt for e in edits], 8)]
        t.append(greedy(m, tok, [para[i] for i in p_idx], 8))
        t.append(greedy(m, tok, [chat(q) for q in q_text], 32, special=False))
        t.append(greedy(m, tok, [loc[i] for i in l_idx], 6))
        t.append(greedy(m, tok, probes, 6))
        return {"cloze": t[0], "para": t[1], "question": t[2], "loc": t[3], "probes": t[4]}

    def has(ans: str, i: int) -> bool:
        return edits[i].target_new.casefold() in ans.casefold()

    base = ask(model)
    ppl0 = perplexity(model, tok)

    def score(name: str, got: dict, ppl: float | None, cpu: float, wall: float) -> None:
        r = {
            "method": name, "n": len(edits), "jobs": a.sequential if name != "fast-path" else "-",
            "reliability": 100 * sum(has(x, i) for i, x in enumerate(got["cloze"])) / len(edits),
            "paraphrase": 100 * sum(has(x, i) for i, x in zip(p_idx, got["para"], strict=True)) / max(1, len(p_idx)),
            "question": 100 * sum(has(x, i) for i, x in zip(q_idx, got["question"], strict=True)) / max(1, len(q_idx)),
            "neighbourhood": 100 * sum(x.strip() == y.strip() for x, y in zip(got["loc"], base["loc"], strict=True)) / max(1, len(l_idx)),
            "probes": 100 * sum(x.strip() == y.strip() for x, y in zip(got["probes"], base["probes"], strict=True)) / len(probes),
            "ppl": None if ppl is None else 100 * (ppl / ppl0 - 1),
            "cpu_s_per_edit": cpu / len(edits), "wall_s": wall,
        }
        rows.append(r)
        details[name] = got
        print(json.dumps(r), flush=True)

    for name in [m.strip() for m in a.methods.split(",") if m.strip()]:
        if name == "fast-path":
            from kem.editor import KnowledgeEditor

            with tempfile.TemporaryDirectory() as home:
                s = settings.model_copy(update={"home": Path(home), "store": None})
                c0, t0 = time.process_time(), time.perf_counter()
                with KnowledgeEditor.open(home, settings=s) as ke:  # its own engine: the base weights + follower
                    for e in edits:
                        ke.add(e)

                    def gen(ps, n, chat_mode=False):  # the token budgets of ask(), so answers compare
                        return [(ke.chat(p, max_new_tokens=n).text if chat_mode else ke.generate(p, max_new_tokens=n).text)
                                for p in ps]

                    got = {"cloze": gen([e.rendered_prompt for e in edits], 8), "para": gen([para[i] for i in p_idx], 8),
                           "question": gen(q_text, 32, True), "loc": gen([loc[i] for i in l_idx], 6),
                           "probes": gen(probes, 6)}
                score(name, got, None, time.process_time() - c0, time.perf_counter() - t0)
            continue
        spec = get_method(name)
        over = {}
        for h in a.hparams:
            m, _, kv = h.partition(":")
            if m == name:
                k, _, v = kv.partition("=")
                try:
                    over[k] = json.loads(v)  # numbers, true/false, lists ("[3,4,5]")
                except ValueError:
                    over[k] = v
        ctx = EditContext.from_cache_dir(settings.cache_dir, corpus=a.corpus)
        ctx.pin_covariance(model)
        ctx.follower = follower_for(settings)
        ctx.progress = True
        hp = spec.hparams_for(model, **over)
        c0, t0 = time.process_time(), time.perf_counter()
        handles = []
        k = max(1, a.sequential)
        for j in range(k):
            chunk = edits[j * len(edits) // k: (j + 1) * len(edits) // k]
            delta = spec.compute(model, tok, chunk, hp, ctx)
            if delta.meta.get("seconds"):  # where a method's time went (distill: teacher, retain, start, train)
                print(name, f"job {j + 1}/{k}", {s: round(v, 1) for s, v in delta.meta["seconds"].items()}, flush=True)
            handles.append(apply_delta(model, delta))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        got = ask(model)
        ppl = perplexity(model, tok)
        for h in reversed(handles):
            h.revert()
        score(name, got, ppl, cpu, wall)

    print()
    print("| method | n | jobs | reliability | paraphrase | question | neighbourhood unchanged | probes unchanged | perplexity | CPU-s/edit | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:+.1f}%"
        print(f"| {r['method']} | {r['n']} | {r['jobs']} | {r['reliability']:.1f} | {r['paraphrase']:.1f} | {r['question']:.1f} | "
              f"{r['neighbourhood']:.1f} | {r['probes']:.1f} | {ppl} | {r['cpu_s_per_edit']:.2f} | {r['wall_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "args": vars(a), "answers": details}, indent=1))


if __name__ == "__main__":
    main()
