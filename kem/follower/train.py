"""Train the edit-follower: a LoRA (peft) on the served model that answers from the facts kem composes.

``kem follower train`` calls :func:`train_follower`. The loop is plain PyTorch (AdamW, warm-up then
cosine decay, loss on the answer tokens only, length-bucketed batches); it saves a checkpoint every
``save_every`` steps and a restarted run with the same options resumes from it. The result is a peft
adapter folder (fp16 safetensors) with ``manifest.json``: base model hash, data hash, command, options.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kem.errors import ValidationError
from kem.follower.data import Example, Record, build_examples, file_sha256, without_eval_overlap

log = logging.getLogger(__name__)

#: The module names a LoRA targets on LLaMA-style models (SmolLM2): attention and MLP projections.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (all recorded in the manifest).

    Attributes:
        records: CounterFact train records used (the first N after a seeded shuffle).
        steps: Optimiser steps (0: one pass over the examples).
        batch_size: Examples per step.
        lr: AdamW learning rate (peak, after ``warmup`` steps; cosine decay to 10% at the end).
        rank, alpha: LoRA rank and scaling.
        first_layer: LoRA on decoder layers ``first_layer..L-1`` (None: the upper two thirds).
        targets: Module names that get a LoRA.
        seed: Data and initialisation seed.
        max_distractors: Unrelated facts beside the relevant one (0..N).
        save_every: Steps between checkpoints (resume points).
    """

    records: int = 1200
    steps: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 10
    rank: int = 8
    alpha: int = 16
    first_layer: int | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    max_distractors: int = 2
    save_every: int = 25

    def __post_init__(self) -> None:
        for name in ("records", "batch_size", "rank", "alpha", "save_every"):
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be >= 1 (got {getattr(self, name)})", field=name)
        if self.steps < 0:
            raise ValidationError(f"steps must be >= 0 (got {self.steps})", field="steps")
        if not self.lr > 0:
            raise ValidationError(f"lr must be > 0 (got {self.lr})", field="lr")


@dataclass
class TrainResult:
    out: Path
    steps: int
    examples: int
    seconds: float
    losses: list[float] = field(default_factory=list)


# ---- the base model's own answers -----------------------------------------------------------------------
def base_answerer(model: Any, tokenizer: Any, batch_size: int = 32,
                  progress: bool = False) -> Callable[[Sequence[str], bool, int], list[str]]:
    """``answers(prompts, chat, max_new_tokens)``: greedy answers of ``model`` (adapter off), batched
    with left padding; completions stop at the first newline."""
    import torch
    from tqdm.auto import tqdm

    def answers(prompts: Sequence[str], chat: bool, max_new_tokens: int) -> list[str]:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) if chat else p for p in prompts]
        out: list[str] = []
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            res: dict[int, str] = {}
            for s in tqdm(range(0, len(order), batch_size), desc=f"base answers ({'chat' if chat else 'completion'})",
                          unit="batch", disable=not progress, leave=False):
                idx = order[s:s + batch_size]
                enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(model.device)
                with torch.inference_mode():
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                         top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
                for row, i in enumerate(idx):
                    t = tokenizer.decode(gen[row, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                    res[i] = t if chat else t.split("\n")[0]
            out = [res[i] for i in range(len(texts))]
        finally:
            tokenizer.padding_side = side
        return out

    return answers


# ---- tokenisation ------------------------------------------------------------------------------------------
def encode_example(ex: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)`` exactly as served: a chat answer ends with the template's end of turn."""
    if ex.chat:
        msgs = [{"role": r, "content": c} for r, c in ex.messages or ()]
        prefix = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": ex.answer}], tokenize=False)
        if not full.startswith(prefix):
            raise ValidationError("the chat template does not extend the generation prompt", field="chat_template")
        prompt, answer = prefix, full[len(prefix):].rstrip("\n")
    else:
        prompt, answer = ex.text or "", ex.answer + "\n"
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return list(p), list(a)


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches (less padding), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    return chunks


# ---- the run -----------------------------------------------------------------------------------------------
def lora_config(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    n_layers = int(model.config.num_hidden_layers)
    first = cfg.first_layer if cfg.first_layer is not None else n_layers // 3
    if not 0 <= first < n_layers:
        raise ValidationError(f"first_layer must be in 0..{n_layers - 1} (got {first})", field="first_layer")
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(cfg.targets), layers_to_transform=list(range(first, n_layers)))


def train_follower(model: Any, tokenizer: Any, data: str | Path, out: str | Path, cfg: TrainConfig, *,
                   base_model_id: str = "", command: str = "", progress: bool = True,
                   resume: bool = True) -> TrainResult:
    """Train the edit-follower on ``model`` (left unchanged: the LoRA is trained on a wrapper) and
    write the adapter folder ``out``.

    Args:
        model: The base causal LM (fp32 on CPU is fine: ~6 s per step of 16 short examples, 2 cores).
        tokenizer: Its tokenizer (with a chat template).
        data: The CounterFact **train** split (flat format). Evaluation splits are refused.
        out: Adapter folder to write (``adapter_config.json``, ``adapter_model.safetensors``,
            ``manifest.json``); ``out/checkpoint`` holds the resume point while training runs.
        cfg: See :class:`TrainConfig`.
        base_model_id: Recorded in the manifest (e.g. the model's safetensors hash).
        command: The command line, recorded in the manifest.
        resume: Continue from ``out/checkpoint`` when it was written with the same options and data.
    """
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from tqdm.auto import tqdm

    from kem.follower.data import load_records

    data, out = Path(data), Path(out)
    if "train" not in data.name:
        raise ValidationError(f"the edit-follower trains on the CounterFact train split only (got {data.name}); "
                              "the edit split, ZsRE and MQuAKE are for evaluation", field="data")
    t0 = time.time()
    all_records = load_records(data)
    eligible = without_eval_overlap(all_records, data.parent.parent)
    log.info("%d of %d train records kept (the rest touch an evaluation set: case id, text or subject)",
             len(eligible), len(all_records))
    records: list[Record] = list(eligible)
    rng = random.Random(cfg.seed)
    rng.shuffle(records)
    records = records[: cfg.records]
    data_hash = file_sha256(data)
    log.info("building the training set from %d records of %s", len(records), data)
    examples = build_examples(records, base_answerer(model, tokenizer, progress=progress), seed=cfg.seed,
                              max_distractors=cfg.max_distractors)
    enc = [encode_example(e, tokenizer) for e in examples]
    lengths = [len(p) + len(a) for p, a in enc]
    steps = cfg.steps or math.ceil(len(enc) / cfg.batch_size)
    plan: list[list[int]] = []
    while len(plan) < steps:
        plan += _batches(lengths, cfg.batch_size, rng)
    plan = plan[:steps]

    torch.manual_seed(cfg.seed)
    grad_flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    peft_model = get_peft_model(model, lora_config(model, cfg))
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

        def lr_at(step: int) -> float:
            if step < cfg.warmup:
                return cfg.lr * (step + 1) / cfg.warmup
            frac = (step - cfg.warmup) / max(1, steps - cfg.warmup)
            return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

        ckpt = out / "checkpoint"
        key = {"config": _jsonable(asdict(cfg)), "data_sha256": data_hash, "steps": steps, "base_model": base_model_id}
        start, losses = 0, []
        if resume and (ckpt / "state.pt").exists():
            state = torch.load(ckpt / "state.pt", weights_only=False)
            if state.get("key") == key:
                set_peft_model_state_dict(peft_model, state["adapter"])
                opt.load_state_dict(state["optim"])
                start, losses = int(state["step"]), list(state["losses"])
                log.info("resuming from step %d (%s)", start, ckpt)
            else:
                log.warning("ignoring %s: written with other options or data", ckpt)

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        peft_model.train()
        bar = tqdm(total=steps, initial=start, desc="training edit-follower", disable=not progress)
        try:
            for step in range(start, steps):
                rows = [enc[i] for i in plan[step]]
                width = max(len(p) + len(a) for p, a in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                labels = torch.full((len(rows), width), -100, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, (p, a) in enumerate(rows):
                    seq = p + a
                    ids[r, : len(seq)] = torch.tensor(seq)
                    labels[r, len(p): len(seq)] = torch.tensor(a)
                    mask[r, : len(seq)] = 1
                dev = model.device
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                loss = peft_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
                if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                    ckpt.mkdir(parents=True, exist_ok=True)
                    tmp = ckpt / "state.pt.tmp"
                    torch.save({"key": key, "step": step + 1, "losses": losses, "optim": opt.state_dict(),
                                "adapter": get_peft_model_state_dict(peft_model)}, tmp)
                    tmp.replace(ckpt / "state.pt")
        finally:
            bar.close()
        peft_model.eval()
        manifest = {
            "name": "kem-editor", "kind": "kem edit-follower (LoRA)", "base_model": base_model_id,
            "data": str(data.name), "data_sha256": data_hash, "records": len(records),
            "excluded_eval_overlap": len(all_records) - len(eligible),
            "examples": len(examples),
            "example_kinds": _count(e.kind for e in examples), "steps": steps, "config": _jsonable(asdict(cfg)),
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "train_seconds": round(time.time() - t0, 1),
            "command": command, "train_case_ids": sorted(r.case_id for r in records),
        }
        save_adapter(peft_model, out, manifest)
        shutil.rmtree(ckpt, ignore_errors=True)
    finally:  # the caller gets its model back: no LoRA layers, its parameters' flags as they were
        peft_model.unload()
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return TrainResult(out, steps, len(examples), time.time() - t0, losses)


def save_adapter(peft_model: Any, out: Path, manifest: dict[str, Any]) -> None:
    """Write the adapter as fp16 safetensors + config + manifest, atomically (a temporary folder, then
    renamed over ``out``; an interrupted save leaves the old adapter)."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_model.safetensors").chmod(0o644)
    cfg = peft_model.peft_config["default"]
    cfg.base_model_name_or_path = Path(str(cfg.base_model_name_or_path or "")).name or None  # no local paths
    cfg.save_pretrained(str(tmp))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    keep = out / "checkpoint"
    if keep.exists():
        shutil.move(str(keep), str(tmp / "checkpoint"))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def _count(items: Any) -> dict[str, int]:
    c: dict[str, int] = {}
    for i in items:
        c[i] = c.get(i, 0) + 1
    return c


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
