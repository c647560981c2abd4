"""Benchmark/eval driver for docs/results.md: one dataset, several modes, one process.

The model and embedder load once; the modes run one after the other on one evaluator, so the
unedited model's answers (and any request text identical between modes) are computed once. The first
mode's wall time is a standalone run's; later modes' times are lower by what they reuse.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eval.py --dataset counterfact --n 200 --out eval-out/cf
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--methods", default="none,ike")
    ap.add_argument("--modes", default="single,batch")
    ap.add_argument("--out", default="eval-out")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--render", nargs="*", metavar="DIR",
                    help="Only print combined tables of finished runs (their --out prefixes) and exit.")
    ap.add_argument("--first", type=int, default=0, help="With --render: also a table of the first K cases.")
    ap.add_argument("--plots", default=None, metavar="DIR",
                    help="With --render: write <DIR>/<name>-metrics.png and <name>-scope.png per run prefix.")
    args = ap.parse_args()
    if args.render is not None:
        render(args.render, args.modes.split(","), args.first, args.plots)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from kem.eval.harness import EvalConfig, Evaluator
    from kem.eval.report import markdown_table
    from kem.eval.run import load_context, run_eval
    from kem.eval.scoring import Scorer

    t0 = time.perf_counter()
    ctx = load_context()
    load_s = time.perf_counter() - t0
    ev = Evaluator(ctx, EvalConfig(), Scorer(ctx.tokenizer, batch_size=args.batch_size))
    timings = {"load_s": load_s}
    for mode in args.modes.split(","):
        out = Path(f"{args.out}-{mode}")
        res = run_eval(args.methods, args.dataset, n=args.n, seed=args.seed, mode=mode, out=out,
                       evaluator=ev, progress=not args.quiet)
        timings[f"{mode}_s"] = res["wall_s"]
        timings[f"{mode}_cpu_s"] = res["cpu_s"]
        print(markdown_table(res["summary"], f"{args.dataset} n={res['config']['n']} {mode}"))
        print(f"{mode}: {res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU; scorer {res['scorer']}", flush=True)
    Path(f"{args.out}-timings.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings))


def render(prefixes: list[str], modes: list[str], first: int, plots: str | None = None) -> None:
    """Print one markdown table per run prefix: columns ``method (mode)``; optionally the plots."""
    from kem.eval.harness import summarize
    from kem.eval.metrics import fluency
    from kem.eval.report import markdown_table, plot_metrics, plot_scope

    for prefix in prefixes:
        cols, sub, info, scope = {}, {}, [], {}
        for mode in modes:
            path = Path(f"{prefix}-{mode}") / "results.json"
            if not path.is_file():
                continue
            res = json.loads(path.read_text())
            info.append(f"{mode}: n={res['config']['n']}, wall {res['wall_s']:.0f} s")
            for m in res["summary"]:
                cases = res["cases"][m]
                for c in cases:  # fluency as defined now (runs before it was: entropy of any length)
                    for p in c["probes"]:
                        if "fluency" in p:
                            p["fluency"] = fluency(p.get("fluency_text", p.get("generated", "")))
                cols[f"{m} ({mode})"] = {**res["summary"][m], **summarize(cases)}
                sc = res["scope_scores"].get(m) or {}
                if sc.get("in") or sc.get("out"):
                    scope[f"{m} ({mode})"] = (sc.get("in") or [], sc.get("out") or [])
                if first:
                    sub[f"{m} ({mode})"] = summarize(cases[:first])
        print(f"## {prefix} ({'; '.join(info)})\n")
        print(markdown_table(cols))
        if first:
            print(f"First {first} cases:\n")
            print(markdown_table(sub))
        if plots and cols:
            name = Path(prefix).name
            Path(plots).mkdir(parents=True, exist_ok=True)
            plot_metrics(cols, Path(plots) / f"{name}-metrics.png", f"{name} ({'; '.join(info)})")
            plot_scope(scope, Path(plots) / f"{name}-scope.png")


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
