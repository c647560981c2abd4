"""Calibrate the scope decision's thresholds on the CounterFact TRAIN split (never on eval data).

All N edits live in one memory (batch mode). Queries: each edit's prompt and rephrase (in scope of
their own edit) and locality prompt (in scope of no edit). For each threshold pair it reports the
scope decision's precision and recall, where a positive is "the query's own edit is applied" and a
false positive is any edit applied to a locality query or a wrong edit applied to an in-scope query.

    .venv/bin/python bench/calibrate_scope.py --n 2000
    .venv/bin/python bench/calibrate_scope.py --n 2000 --backend onnx-int8 --single-queries   # another embedder

``--single-queries`` embeds each query alone (as a served request is), not in one batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from kem.edit import Edit
from kem.embedding import BACKENDS, SentenceEmbedder
from kem.index import NamespacedIndex
from kem.scope import subject_match

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--split", default="counterfact/counterfact-train.json")
    ap.add_argument("--backend", default="torch", choices=BACKENDS, help="embedder backend (KEM_EMBEDDER_BACKEND)")
    ap.add_argument("--single-queries", action="store_true", help="embed each query alone, as served")
    args = ap.parse_args()
    recs = json.loads((DATA / args.split).read_text())[: args.n]
    edits = [Edit(subject=r["subject"], prompt=r["prompt"], target_new=r["target_new"]) for r in recs]
    emb = SentenceEmbedder(backend=args.backend, lru_size=0)
    t0 = time.perf_counter()
    keys = emb.embed([e.rendered_prompt for e in edits])
    idx = NamespacedIndex(emb.dim)
    for e, k in zip(edits, keys, strict=True):
        idx.add("ns", e.id, k[None, :])
    queries = [(r["prompt"], i, True) for i, r in enumerate(recs)] + \
              [(r["rephrase_prompt"], i, True) for i, r in enumerate(recs)] + \
              [(r["locality_prompt"], i, False) for i, r in enumerate(recs)]
    qv = np.concatenate([emb.embed([q]) for q, _, _ in queries]) if args.single_queries else \
        emb.embed([q for q, _, _ in queries])
    hits = idx.search("ns", qv, 4)
    by_id = {e.id: (n, e) for n, e in enumerate(edits)}
    rows = []
    for (q, own, pos), h in zip(queries, hits, strict=True):
        cands = [(by_id[i][0], s, subject_match(q, by_id[i][1].subject)) for i, s in h]
        rows.append((own, pos, cands))
    print(f"embedder {emb.key}: embedded and searched {len(queries)} queries over {len(edits)} edits in "
          f"{time.perf_counter() - t0:.1f} s")
    print("| threshold | subject_threshold | min_subject_match | recall (own edit applied) | rephrase recall | "
          "locality false-apply rate | wrong-edit rate |")
    print("|---|---|---|---|---|---|---|")
    best = None
    for th, sth, msm in itertools.product((0.7, 0.75, 0.8, 0.85, 0.9), (0.25, 0.3, 0.35, 0.4, 0.5), (0.5, 0.67, 1.0)):
        tp = fp_loc = wrong = 0
        reph_tp = 0
        for n, (own, pos, cands) in enumerate(rows):
            applied = [c for c, s, sm in cands if s >= th or (sm >= msm and s >= sth)]
            if pos:
                tp += own in applied
                reph_tp += own in applied and n >= len(recs)
                wrong += any(c != own for c in applied)
            else:
                fp_loc += bool(applied)
        n_pos = 2 * len(recs)
        rec, reph, loc_fp, wr = tp / n_pos, reph_tp / len(recs), fp_loc / len(recs), wrong / n_pos
        util = rec - 2 * loc_fp - wr
        if best is None or util > best[0]:
            best = (util, th, sth, msm)
        print(f"| {th} | {sth} | {msm} | {rec:.3f} | {reph:.3f} | {loc_fp:.3f} | {wr:.3f} |")
    print(f"\nbest (recall - 2*locality_fp - wrong): threshold={best[1]} subject_threshold={best[2]} "
          f"min_subject_match={best[3]}")


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
