"""Chains of edits: what following them costs the requests that have none, and how often they are found.

One SQLite store holds 1,000 CounterFact edit-split records and ``--mquake`` MQuAKE-hard cases (4 edits
each). The same editor answers three kinds of request through the fast path (``rewrite_chat``: retrieval,
scope, chain, composition; no generation), with ``chain_depth`` 4 and 0 on the same memory, interleaved,
in one process:

- in scope, no chain: the CounterFact records' own prompts (an edit applies; its object leads nowhere
  the request asks about);
- out of scope: the records' neighbourhood prompts;
- multi-hop: the MQuAKE questions (chains).

Prints p50 / p95 per kind and depth, the difference, and for the multi-hop questions how many got every
hop of their case in the prompt.

    .venv/bin/python bench/bench_chains.py [--records 1000] [--mquake 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--mquake", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from kem.datasets import _mquake, counterfact_edit
    from kem.editor import KnowledgeEditor
    from kem.settings import Settings

    cf = json.loads((DATA / "counterfact" / "counterfact-edit.json").read_text())[:a.records]
    mq = [_mquake(r, i) for i, r in enumerate(json.loads((DATA / "mquake" / "MQuAKE-hard.json").read_text())[:a.mquake])]
    with tempfile.TemporaryDirectory(prefix="kem-bench-chains-") as tmp:
        s = Settings()
        on = KnowledgeEditor.open(Path(tmp), settings=s)
        on.add_many([counterfact_edit(r, i, "bench") for i, r in enumerate(cf)], batch_size=1000)
        on.add_many([e for c in mq for e in c.edits], batch_size=1000)
        off = KnowledgeEditor(on.memory, settings=s.model_copy(update={"chain_depth": 0}))
        kinds = {"in scope, no chain": [r["prompt"] for r in cf], "out of scope": [r["locality_prompt"] for r in cf],
                 "multi-hop": [p.text for c in mq for p in c.portability]}
        ask = lambda ke, q: ke.rewrite_chat([{"role": "user", "content": q}], follower="kem-editor")  # noqa: E731
        for q in kinds["in scope, no chain"][:50]:  # warm up (embedder, caches)
            ask(on, q), ask(off, q)
        times: dict[tuple[str, int], list[float]] = {}
        chained = {}
        for kind, qs in kinds.items():
            for _ in range(a.repeat):
                for i, q in enumerate(qs):
                    ask(off, q)  # the query's embedding cached for both, so only the chain step differs
                    order = ((4, on), (0, off)) if i % 2 else ((0, off), (4, on))
                    for depth, ke in order:
                        t0 = time.perf_counter()
                        rw = ask(ke, q)
                        times.setdefault((kind, depth), []).append((time.perf_counter() - t0) * 1000)
                        if depth == 4:
                            chained[(kind, q)] = any(x.via for x in rw.applied)
        examples = []
        for q in kinds["in scope, no chain"]:
            if chained[("in scope, no chain", q)] and len(examples) < 10:
                examples.append(f"{q!r}: " + " | ".join(x.edit.fact for x in ask(on, q).applied))
        complete = 0
        for c in mq:
            need = {e.fact for e in c.edits}
            for p in c.portability:
                complete += need <= {x.edit.fact for x in ask(on, p.text).applied}
        n_multi = sum(len(c.portability) for c in mq)
        on.close()
    print("| request | n | p50 depth 0 (ms) | p50 depth 4 (ms) | p50 difference (ms) | p95 depth 0 / 4 (ms) | with a chain |")
    print("|---|---|---|---|---|---|---|")
    for kind, qs in kinds.items():
        t0, t4 = times[(kind, 0)], times[(kind, 4)]
        p = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1]  # noqa: E731
        share = sum(chained[(kind, q)] for q in qs)
        print(f"| {kind} | {len(qs)} x {a.repeat} | {statistics.median(t0):.2f} | {statistics.median(t4):.2f} | "
              f"{statistics.median(t4) - statistics.median(t0):+.2f} | {p(t0, 95):.2f} / {p(t4, 95):.2f} | "
              f"{share} of {len(qs)} |")
    print("\nchains found on single-edit prompts:\n" + "\n".join(f"- {e}" for e in examples))
    print(f"\nmulti-hop questions with every hop of their case in the prompt: {complete} of {n_multi} "
          f"({100 * complete / max(1, n_multi):.1f}%)")


if __name__ == "__main__":
    main()
