"""Per-tenant adapters (issue 15): each method's delta for N CounterFact edits, exported as a peft LoRA
adapter (kem.consolidation.lora_export), against the same delta merged into the weights.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_tenant_adapters.py --edits 10

Per method: adapter size vs the checkpoint (float32 safetensors), per-module ranks, the SVD truncation's
relative error (FT-L's dense update; low-rank methods are exact up to --max-rank), the largest logit
difference (peft on the base model vs merged weights; every position of the edited prompts and of 20
held-out probes), greedy agreement (12 tokens) on those prompts, and reliability (the greedy answer
carries target_new, no edit in the prompt) from the adapter alone vs the merged weights. FT-L also at
lower ranks (--ftl-ranks) to show what truncation costs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@torch.no_grad()
def logits_and_greedy(model, tok, prompts: list[str], n: int) -> tuple[list[torch.Tensor], list[str]]:
    logits, answers = [], []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        logits.append(model(**ids).logits[0].float())
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return logits, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["rome", "memit", "alphaedit", "ft-l"])
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--ftl-ranks", nargs="*", type=int, default=[576, 16, 4])
    ap.add_argument("--cov-samples", type=int, default=200, help="covariance texts (200: the tests' cached statistics)")
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--corpus", default=str(DATA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    ap.add_argument("--bare", action="store_true", help="context_templates=0 (no generated prefixes): ~5x cheaper "
                    "compute; the adapter-vs-merged comparison does not depend on it")
    ap.add_argument("--json", help="also write the rows here (after each method)")
    args = ap.parse_args()

    import tempfile

    from peft import PeftModel

    from kem.consolidation.context import EditContext
    from kem.consolidation.delta import apply_delta
    from kem.consolidation.judge import default_probes
    from kem.consolidation.lora_export import export_lora
    from kem.consolidation.method_registry import get_method
    from kem.edit import Edit
    from kem.models import load_causal_lm
    from kem.settings import Settings

    settings = Settings(device="cpu")
    model, tok = load_causal_lm(settings.model, settings.cache_dir, device="cpu")
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied embeddings once
    ckpt_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    recs = json.loads(Path(args.data).read_text())[: args.edits]
    edits = [Edit(subject=r["subject"], prompt=r["prompt"], target_new=r["target_new"], target_true=r["ground_truth"])
             for r in recs]
    probes = default_probes()[: args.probes]
    prompts = [e.rendered_prompt for e in edits] + probes
    ctx = EditContext.from_cache_dir(settings.cache_dir, corpus=args.corpus)
    ctx.pin_covariance(model)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    for name in tqdm(args.methods, desc="methods"):
        spec = get_method(name)
        extra = {"mom2_samples": args.cov_samples} if "mom2_samples" in spec.hparams_cls.model_fields else {}
        if args.bare and "context_templates" in spec.hparams_cls.model_fields:
            extra["context_templates"] = 0
        hp = spec.hparams_for(model, **extra)
        t0 = time.perf_counter()
        delta = spec.compute(model, tok, edits, hp, ctx)
        secs = time.perf_counter() - t0
        merged = copy.deepcopy(model)
        apply_delta(merged, delta)
        ref_logits, ref_answers = logits_and_greedy(merged, tok, prompts, args.tokens)
        del merged
        ranks = [args.max_rank] + (args.ftl_ranks if name == "ft-l" else [])
        for max_rank in ranks:
            folder = tmp / f"{name}-r{max_rank}"
            exp = export_lora(delta, folder, base_model=str(settings.model), max_rank=max_rank)
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
            logits, answers = logits_and_greedy(peft_model, tok, prompts, args.tokens)
            del peft_model
            n = len(edits)
            diff_e = max(float((a - b).abs().max()) for a, b in zip(logits[:n], ref_logits[:n], strict=True))
            diff_u = max(float((a - b).abs().max()) for a, b in zip(logits[n:], ref_logits[n:], strict=True))
            rows.append({
                "method": name, "max_rank": max_rank, "edits": n, "compute_s": round(secs, 1),
                "modules": len(exp.modules), "ranks": sorted({m.rank for m in exp.modules}),
                "full_ranks": sorted({m.full_rank for m in exp.modules}),
                "max_rel_error": exp.max_rel_error, "adapter_bytes": exp.nbytes, "checkpoint_bytes": ckpt_bytes,
                "size_pct": 100 * exp.nbytes / ckpt_bytes,
                "max_logit_diff_edited": diff_e, "max_logit_diff_unrelated": diff_u,
                "greedy_same": sum(a == b for a, b in zip(answers, ref_answers, strict=True)), "prompts": len(prompts),
                "reliability_adapter": sum(e.target_new in a for e, a in zip(edits, answers[:n], strict=True)) / n,
                "reliability_merged": sum(e.target_new in a for e, a in zip(edits, ref_answers[:n], strict=True)) / n,
            })
            tqdm.write(json.dumps(rows[-1]))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\nSmolLM2-135M-Instruct, {args.edits} CounterFact edits per method, checkpoint {ckpt_bytes / 2**20:.0f} MiB "
          f"(float32); {args.probes} held-out probes; greedy {args.tokens} tokens\n")
    print("| method | max rank | modules | rank (full) | trunc. error | adapter | % of ckpt | max logit diff edited / unrelated "
          "| same greedy | reliability adapter / merged |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['max_rank']} | {r['modules']} | {','.join(map(str, r['ranks']))} "
              f"({','.join(map(str, r['full_ranks']))}) | {r['max_rel_error']:.1e} | {r['adapter_bytes'] / 1024:.0f} KiB | "
              f"{r['size_pct']:.3f}% | {r['max_logit_diff_edited']:.1e} / {r['max_logit_diff_unrelated']:.1e} | "
              f"{r['greedy_same']}/{r['prompts']} | {r['reliability_adapter']:.2f} / {r['reliability_merged']:.2f} |")


if __name__ == "__main__":
    main()
