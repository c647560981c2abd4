"""Does the edit-follower still work over a consolidated model version? (issue: "vN keeps working").

Consolidates K CounterFact edits into the weights with a weight-editing method (MEMIT by default), as
``kem consolidate`` does, then evaluates ``adapter`` (and ``ike``) on N *other* pending edits in batch
mode, on the unedited model and on the consolidated one, in one process. Locality on the consolidated
model is measured against that model's own answers (what serving vN means).

    OMP_NUM_THREADS=2 .venv/bin/python bench/follower_over_version.py --n 100 --consolidate 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="Pending edits evaluated (records 0..n-1).")
    ap.add_argument("--consolidate", type=int, default=32, help="Edits consolidated (records 500..500+K-1).")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--methods", default="ike,adapter")
    args = ap.parse_args()

    from kem.consolidation.weight_eval import apply_fn
    from kem.datasets import load_cases
    from kem.eval.harness import EvalConfig, Evaluator
    from kem.eval.report import markdown_table
    from kem.eval.run import load_context

    ctx = load_context()
    data = ROOT.parent / "shared/data/counterfact/counterfact-edit.json"
    cases = load_cases(str(data), n=args.n)
    absorbed = load_cases(str(data), n=500 + args.consolidate)[500:]
    methods = args.methods.split(",")
    cfg = EvalConfig(mode="batch", fluency_cases=0)
    cols = {}
    for m, r in zip(methods, Evaluator(ctx, cfg).run(methods, cases, progress=False), strict=True):
        cols[f"{m} on base"] = r.summary
    t0 = time.perf_counter()
    revert = apply_fn(args.method, ctx)(ctx.model, ctx.tokenizer, [e for c in absorbed for e in c.edits])
    print(f"{args.method}: {args.consolidate} edits consolidated in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        for m, r in zip(methods, Evaluator(ctx, cfg).run(methods, cases, progress=False), strict=True):
            cols[f"{m} on v1 ({args.method}, {args.consolidate} edits)"] = r.summary
        absorbed_runs = Evaluator(ctx, cfg).run(["none"], absorbed, progress=False)
        cols["v1's own edits, no fast path"] = absorbed_runs[0].summary
    finally:
        revert()
    print(markdown_table(cols, f"CounterFact n={args.n} pending edits, batch"))


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
