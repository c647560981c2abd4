"""Consolidation benchmark: CPU seconds per edit for each method and batch size, covariance time per
1k texts, peak memory, and edit quality (reliability, paraphrase, locality) on CounterFact.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_consolidation.py --batches 1 10 100 --threads 1

Batch size 1 is the mean over ``--singles`` different edits, each computed alone (one edit is noisy:
the value optimisation stops early on some edits). AlphaEdit's null-space projectors (derived from the
covariance statistics, once per base model) are computed by the untimed warm-up call.

Reference (EasyEdit on this machine and model, one thread, single edits, covariance excluded):
ROME 69 s, MEMIT 33 s, AlphaEdit 45 s, FT-L 5 s per edit.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

REFERENCE = {"rome": 69.0, "memit": 33.0, "alphaedit": 45.0, "ft-l": 5.0}
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def greedy(model, tok, prompts, n=4):
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), 32):
        enc = tok(prompts[i : i + 32], return_tensors="pt", padding=True)
        gen = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["rome", "memit", "alphaedit", "ft-l"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--cov-samples", type=int, default=1000, help="covariance texts used by the methods")
    ap.add_argument("--cov-bench-samples", type=int, default=200, help="texts for the covariance timing (0: skip)")
    ap.add_argument("--sample-bench", type=int, default=0, help="time the model-sampled corpus on this many texts (0: skip)")
    ap.add_argument("--singles", type=int, default=5, help="edits averaged for batch size 1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    ap.add_argument("--cov-sweep", nargs="*", type=int, default=[],
                    help="also measure MEMIT quality on the first --sweep-edits edits for these covariance sample counts")
    ap.add_argument("--sweep-edits", type=int, default=10)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kem.consolidation import EditContext, apply_delta, get_method
    from kem.consolidation.covariance import CovarianceCache, compute_second_moments, iter_corpus
    from kem.edit import Edit
    from kem.models import load_causal_lm
    from kem.settings import Settings

    model, tok = load_causal_lm("smollm2-135m-instruct", Settings().cache_dir)
    recs = json.loads(Path(args.data).read_text())
    edits = [Edit(subject=r["subject"], prompt=r["prompt"], target_new=r["target_new"]) for r in recs]

    rows = []
    if args.cov_bench_samples:
        texts = [t for _, t in zip(range(args.cov_bench_samples), iter_corpus(args.corpus), strict=False)]
        layers = [3, 4, 5, 6, 7]
        t0, c0 = time.perf_counter(), time.process_time()
        _, tokens = compute_second_moments(model, tok, layers, texts, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        per_k = 1000 / len(texts)
        print(f"covariance: {len(texts)} texts ({tokens} tokens), 5 layers: {wall:.1f} s wall, {cpu:.1f} CPU-s "
              f"-> {wall * per_k:.1f} s wall / {cpu * per_k:.1f} CPU-s per 1k texts (reference: ~1200 s per 1k)")

    if args.sample_bench:  # --corpus model: texts sampled from the model itself
        from kem.consolidation.covariance import sample_texts

        t0, c0 = time.perf_counter(), time.process_time()
        sampled = sample_texts(model, tok, args.sample_bench)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        _, tokens = compute_second_moments(model, tok, [3, 4, 5, 6, 7], sampled, progress=False)
        wall2, cpu2 = time.perf_counter() - t0, time.process_time() - c0
        per_k = 1000 / len(sampled)
        print(f"model-sampled corpus: {len(sampled)} texts ({tokens} tokens): sampling {wall:.1f} s wall / {cpu:.1f} CPU-s, "
              f"with statistics {wall2:.1f} s / {cpu2:.1f} CPU-s -> {wall2 * per_k:.0f} s wall / {cpu2 * per_k:.0f} CPU-s per 1k texts")

    ctx = EditContext(covariance=CovarianceCache(Settings().cache_dir), corpus=args.corpus)
    ctx.pin_covariance(model)
    ctx.second_moments(model, tok, [3, 4, 5, 6, 7], args.cov_samples, 128, ctx.cov_fingerprint)
    base_loc = greedy(model, tok, [r["locality_prompt"] for r in recs[: max(*args.batches, args.singles)]])

    for name in args.methods:
        spec = get_method(name)
        hp = spec.hparams_for(model, **({} if name == "ft-l" else {"mom2_samples": args.cov_samples}))
        local = EditContext(covariance=ctx.covariance, templates=ctx.templates, corpus=ctx.corpus,
                            cov_fingerprint=ctx.cov_fingerprint)
        spec.compute(model, tok, edits[-1:], hp, local)  # untimed warm-up: templates, AlphaEdit's projectors
        for b in args.batches:
            groups = [list(range(i, i + 1)) for i in range(args.singles)] if b == 1 else [list(range(b))]
            wall = cpu = 0.0
            hits = {"rel": 0, "gen": 0, "loc": 0}
            for idx in groups:
                batch = [edits[i] for i in idx]
                local.forget_edits()  # no earlier edits in the weights; AlphaEdit's projectors stay, as in a job
                t0, c0 = time.perf_counter(), time.process_time()
                delta = spec.compute(model, tok, batch, hp, local)
                wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
                handle = apply_delta(model, delta)
                outs = greedy(model, tok, [e.rendered_prompt for e in batch] + [recs[i]["rephrase_prompt"] for i in idx]
                              + [recs[i]["locality_prompt"] for i in idx])
                handle.revert()
                k = len(idx)
                hits["rel"] += sum(o.strip().startswith(e.target_new) for o, e in zip(outs[:k], batch, strict=True))
                hits["gen"] += sum(o.strip().startswith(e.target_new) for o, e in zip(outs[k : 2 * k], batch, strict=True))
                hits["loc"] += sum(outs[2 * k + j] == base_loc[i] for j, i in enumerate(idx))
            n = sum(len(g) for g in groups)
            row = {"method": name, "batch": b, "edits": n, "cpu_s_per_edit": cpu / n, "wall_s_per_edit": wall / n,
                   "speedup_vs_easyedit": REFERENCE[name] / (cpu / n), "reliability": hits["rel"] / n,
                   "generalization": hits["gen"] / n, "locality": hits["loc"] / n, "peak_rss_mb": peak_rss_mb()}
            rows.append(row)
            print(json.dumps(row), flush=True)

    sweep = []
    if args.cov_sweep:
        from kem.consolidation.judge import default_probes
        from kem.consolidation.judge import greedy as job_greedy

        probes = default_probes()
        base_probe = job_greedy(model, tok, probes, 6)
        spec = get_method("memit")
        b = args.sweep_edits
        batch = edits[:b]
        for n in args.cov_sweep:
            local = EditContext(covariance=ctx.covariance, templates=ctx.templates, corpus=ctx.corpus,
                                cov_fingerprint=ctx.cov_fingerprint)
            t0 = time.perf_counter()
            local.second_moments(model, tok, [3, 4, 5, 6, 7], n, 128, ctx.cov_fingerprint)
            t_cov = time.perf_counter() - t0
            hp = spec.hparams_for(model, mom2_samples=n)
            handle = apply_delta(model, spec.compute(model, tok, batch, hp, local))
            outs = greedy(model, tok, [e.rendered_prompt for e in batch] + [r["rephrase_prompt"] for r in recs[:b]])
            probe_out = job_greedy(model, tok, probes, 6)
            handle.revert()
            row = {"cov_samples": n, "cov_s": t_cov, "edits": b,
                   "reliability": sum(e.target_new in o for o, e in zip(outs[:b], batch, strict=True)) / b,
                   "generalization": sum(e.target_new in o for o, e in zip(outs[b:], batch, strict=True)) / b,
                   "probe_locality": sum(x == y for x, y in zip(probe_out, base_probe, strict=True)) / len(probes)}
            sweep.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'method':<10}{'batch':>6}{'CPU-s/edit':>12}{'wall-s/edit':>12}{'EasyEdit':>10}{'ratio':>8}"
          f"{'rel':>6}{'gen':>6}{'loc':>6}{'peak MB':>9}")
    for r in rows:
        print(f"{r['method']:<10}{r['batch']:>6}{r['cpu_s_per_edit']:>12.2f}{r['wall_s_per_edit']:>12.2f}"
              f"{REFERENCE[r['method']]:>10.0f}{r['speedup_vs_easyedit']:>7.1f}x{r['reliability']:>6.2f}"
              f"{r['generalization']:>6.2f}{r['locality']:>6.2f}{r['peak_rss_mb']:>9.0f}")
    if sweep:
        print(f"\nMEMIT, {args.sweep_edits} edits: quality against covariance sample count")
        print(f"{'samples':>8}{'cov s':>8}{'rel':>6}{'gen':>6}{'probe loc':>10}")
        for r in sweep:
            print(f"{r['cov_samples']:>8}{r['cov_s']:>8.1f}{r['reliability']:>6.2f}{r['generalization']:>6.2f}"
                  f"{r['probe_locality']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cov_sweep": sweep}, indent=1))


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
