"""Quickly computed low-rank fact edits, written as peft LoRA folders (for the tenant tests, the
example's fallback and bench/bench_tenants.py; the exact export of ROME / MEMIT deltas is
``kem consolidate --namespace``'s job).

For n facts ``(prompt, target)`` one LoRA of rank n on the LAST layer's ``mlp.down_proj``:

1. one forward pass per prompt reads, at the prompt's last position, the key ``k_i`` (the input of
   that ``down_proj``, 1536-d on SmolLM2-135M) and the residual ``h_i`` before the final norm;
2. the value ``d_i``: a vector for which the target's first token ``t_i`` leads the next-token logits
   of ``lm_head(norm(h_i + d_i))`` by ``margin`` (a few Adam steps on that tiny head alone);
3. ``dW = D (K^T M K)^-1 K^T M`` with ``M = (C + lam I)^-1`` (C: second moment of background keys:
   the prompts' other positions, the answers' positions, unrelated text) maps each fact's key to its
   value exactly and changes the background least: ``B = D`` (out x n), ``A = (K^T M K)^-1 K^T M``
   (n x in), ``lora_alpha = r`` (scale 1).

No gradient step: 10 facts take a few forward passes. The prompts must then be asked as raw text
(completions): the key is read at the prompt's last token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def first_token(tok: Any, target: str) -> int:
    """The first token of `` target`` (answers follow a space)."""
    return int(tok(" " + target.strip(), add_special_tokens=False)["input_ids"][0])


BACKGROUND = (
    "The weather was mild for the season, and people walked along the river after work.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The capital of Japan is Tokyo, a city of many millions.",
    "She opened the book, read a few pages and fell asleep on the sofa.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The meeting was moved to Thursday because the manager was travelling.",
    "Football is played by two teams of eleven players.",
    "The novel was translated into French, German and Spanish.",
    "What is the capital of France? The capital of France is Paris.",
    "He was born in London and studied mathematics at university.",
)


def _keys(model: Any, tok: Any, texts: Sequence[str], layer: int) -> tuple[list[Any], list[Any]]:
    """Per text: the keys (positions, in) entering ``layer``'s down_proj and the pre-norm residuals
    (positions, hidden)."""
    import torch

    mod = model.model.layers[layer].mlp.down_proj
    got: dict[str, Any] = {}
    h1 = mod.register_forward_pre_hook(lambda m, inp: got.__setitem__("k", inp[0][0].detach().float().clone()))
    h2 = model.model.norm.register_forward_pre_hook(lambda m, inp: got.__setitem__("h", inp[0][0].detach().float().clone()))
    keys, resid = [], []
    try:
        with torch.inference_mode():
            for text in texts:
                model(input_ids=tok(text, return_tensors="pt", add_special_tokens=True)["input_ids"])
                keys.append(got["k"])
                resid.append(got["h"])
    finally:
        h1.remove()
        h2.remove()
    return keys, resid


def _value(norm: Any, emb: Any, h: Any, t: int, margin: float, steps: int = 200) -> Any:
    """The smallest-ish ``d`` (hidden,) for which token ``t`` leads the logits of ``norm(h + d)`` by
    ``margin``: Adam on cross-entropy, stopped as soon as the lead is reached."""
    import torch

    d = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.5)
    for _ in range(steps):
        logits = emb @ norm(h + d).float()
        other = torch.cat([logits[:t], logits[t + 1:]]).max()
        if float((logits[t] - other).detach()) >= margin:
            break
        loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([t]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return d.detach()


def fact_delta(model: Any, tok: Any, facts: Sequence[tuple[str, str]], margin: float = 3.0,
               layer: int = -1) -> tuple[Any, Any, str]:
    """``(A (n, in), B (out, n), module name)`` of the rank-n edit making each prompt answer its target."""
    import torch


    n_layers = len(model.model.layers)
    layer = layer % n_layers
    keys, resid = _keys(model, tok, [p for p, _ in facts], layer)
    norm = model.model.norm
    emb = model.get_output_embeddings().weight.detach().float()  # (vocab, hidden)
    values = [_value(norm, emb, r[-1], first_token(tok, target), margin)
              for (_, target), r in zip(facts, resid, strict=True)]
    # background keys the edit must leave alone: every other position of the prompts, the positions of
    # the answers themselves (else the target repeats) and some unrelated text
    cont, _ = _keys(model, tok, [f"{p} {t.strip()}." for p, t in facts], layer)
    other, _ = _keys(model, tok, BACKGROUND, layer)
    n_prompt = [k.shape[0] for k in keys]
    bg = torch.cat([k[:-1] for k in keys] + [c[n:] for c, n in zip(cont, n_prompt, strict=True)] + other)
    Kf = torch.stack([k[-1] for k in keys]).T  # (in, n)
    D = torch.stack(values).T  # (out, n)
    C = bg.T @ bg / bg.shape[0]
    M = torch.linalg.inv(C + 1e-2 * float(torch.trace(C)) / C.shape[0] * torch.eye(C.shape[0]))
    # dW = D (Kf^T M Kf)^-1 Kf^T M: exactly d_i at each fact's key, least energy on the background
    A = torch.linalg.solve(Kf.T @ M @ Kf, Kf.T @ M)  # (n, in)
    return A.contiguous(), D.contiguous(), f"model.layers.{layer}.mlp.down_proj"


def write_lora(folder: str | Path, A: Any, B: Any, module: str, base: str = "smollm2-135m-instruct") -> Path:
    """A peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) holding ``B @ A``
    on ``module`` at scale 1."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = int(A.shape[0])
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
           "bias": "none", "target_modules": [module.rsplit(".", 1)[-1]], "layers_to_transform": None,
           "base_model_name_or_path": base, "use_rslora": False, "fan_in_fan_out": False,
           "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    save_file({f"base_model.model.{module}.lora_A.weight": A.float().contiguous(),
               f"base_model.model.{module}.lora_B.weight": B.float().contiguous()},
              str(folder / "adapter_model.safetensors"))
    return folder


def fact_adapter(model: Any, tok: Any, facts: Sequence[tuple[str, str]], folder: str | Path,
                 margin: float = 3.0) -> Path:
    """Compute the edit of ``facts`` and write it as a LoRA folder."""
    A, B, module = fact_delta(model, tok, facts, margin)
    return write_lora(folder, A, B, module)


def publish_tenant(home: str | Path, namespace: str, adapter: str | Path, edit_ids: Sequence[str] = (),
                   base: str = "smollm2-135m-instruct", parent: str | None = None) -> str:
    """Publish ``adapter`` as the tenant's next version (``<home>/models/tenants/<ns>/vN/adapter``, its
    manifest, ``current``) through :class:`kem.versions.VersionStore`, as ``kem consolidate
    --namespace`` does; ``parent``: the shared version it applies to. Returns ``vN``."""
    import shutil

    from kem.versions import VersionStore

    store = VersionStore(home, namespace=namespace)
    man = store.publish({"base": base, "parent": parent, "tenant_parent": None, "method": "fact-lora",
                         "edit_ids": list(edit_ids)}, lambda folder: shutil.copytree(adapter, folder / "adapter"))
    return man.version
