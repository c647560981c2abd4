"""Quickly computed low-rank fact edits, written as peft LoRA folders (for the tenant tests, the
example's fallback and bench/bench_tenants.py; the exact export of ROME / MEMIT deltas is
``kem consolidate --namespace``'s job).

For facts ``(prompt, target)`` one LoRA on the LAST layer's ``mlp.down_proj``, of rank the targets'
token count (or the number of facts, first tokens only):

1. one batched forward pass over ``prompt + target`` reads, at each position that predicts a target
   token, the key ``k_i`` (the input of that ``down_proj``, 1536-d on SmolLM2-135M) and the residual
   ``h_i`` before the final norm;
2. the value ``d_i``: a vector for which the target token ``t_i`` leads the next-token logits
   of ``lm_head(norm(h_i + d_i))`` by ``margin`` (a few Adam steps on that tiny head alone);
3. ``dW = D (K^T M K)^-1 K^T M`` with ``M = (C + lam I)^-1`` (C: second moment of background keys:
   the prompts' other positions, the answers' positions, unrelated text) maps each fact's key to its
   value exactly and changes the background least: ``B = D`` (out x r), ``A = (K^T M K)^-1 K^T M``
   (r x in), ``lora_alpha = r`` (scale 1).

No gradient step through the model: 10 facts take one batched forward pass and a few hundred steps
on the head. The prompts must then be asked as raw text (completions): the keys are read there.
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


def _keys(model: Any, tok: Any, texts: Sequence[Any], layer: int) -> tuple[list[Any], list[Any]]:
    """Per text: the keys (positions, in) entering ``layer``'s down_proj and the pre-norm residuals
    (positions, hidden). One padded batch (right padding: causal attention keeps each text's own
    positions exact)."""
    import torch

    mod = model.model.layers[layer].mlp.down_proj
    got: dict[str, Any] = {}
    h1 = mod.register_forward_pre_hook(lambda m, inp: got.__setitem__("k", inp[0].detach().float()))
    h2 = model.model.norm.register_forward_pre_hook(lambda m, inp: got.__setitem__("h", inp[0].detach().float()))
    rows = [t if isinstance(t, list) else tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
    finally:
        h1.remove()
        h2.remove()
    return ([got["k"][i, :len(r)].clone() for i, r in enumerate(rows)],
            [got["h"][i, :len(r)].clone() for i, r in enumerate(rows)])


def _values(norm: Any, emb: Any, h: Any, t: Any, margin: float, steps: int = 300) -> Any:
    """Rows ``d`` (n, hidden), each small, for which token ``t[i]`` leads the logits of
    ``norm(h[i] + d[i])`` by ``margin``: Adam on cross-entropy, all facts at once; a row stops moving
    once its lead is reached."""
    import torch

    d = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.5)
    rows = torch.arange(len(t))
    for _ in range(steps):
        logits = norm(h + d).float() @ emb.T  # (n, vocab)
        tgt = logits[rows, t]
        other = logits.scatter(1, t[:, None], float("-inf")).max(dim=1).values
        todo = (tgt - other).detach() < margin
        if not bool(todo.any()):
            break
        loss = torch.nn.functional.cross_entropy(logits[todo], t[todo], reduction="sum")
        opt.zero_grad()
        loss.backward()
        assert d.grad is not None
        d.grad[~todo] = 0
        opt.step()
    return d.detach()


def fact_delta(model: Any, tok: Any, facts: Sequence[tuple[str, str]], margin: float = 3.0,
               layer: int = -1, whole_target: bool = True) -> tuple[Any, Any, str]:
    """``(A (r, in), B (out, r), module name)`` of the edit making each prompt answer its target: every
    token of it (``whole_target``; r = the targets' tokens) or its first token (r = len(facts))."""
    import torch

    layer = layer % len(model.model.layers)
    seqs, forced = [], []  # per fact: prompt + target + "." ids, and the (position, token) pairs to force
    for p, t in facts:
        pid = tok(p, add_special_tokens=True)["input_ids"]
        tid = tok(" " + t.strip(), add_special_tokens=False)["input_ids"]
        seqs.append(pid + tid + tok(".", add_special_tokens=False)["input_ids"])
        forced.append([(len(pid) - 1 + j, tid[j]) for j in range(len(tid) if whole_target else 1)])
    keys, resid = _keys(model, tok, seqs, layer)
    norm = model.model.norm
    emb = model.get_output_embeddings().weight.detach().float()  # (vocab, hidden)
    h = torch.stack([resid[i][pos] for i, f in enumerate(forced) for pos, _ in f])
    targets = torch.tensor([tid for f in forced for _, tid in f])
    D = _values(norm, emb, h, targets, margin).T  # (out, r)
    Kf = torch.stack([keys[i][pos] for i, f in enumerate(forced) for pos, _ in f]).T  # (in, r)
    # background keys the edit must leave alone: the facts' other positions (the prompt before its end,
    # after the answer: else the answer repeats) and some unrelated text
    cache = getattr(model, "_kem_fact_background", None)  # the unrelated text's keys: the same every call
    if cache is None or cache[0] != layer:
        cache = (layer, _keys(model, tok, BACKGROUND, layer)[0])
        model._kem_fact_background = cache
    bg_rows = [keys[i][[q for q in range(len(seqs[i])) if q not in {pos for pos, _ in f}]]
               for i, f in enumerate(forced)]
    bg = torch.cat(bg_rows + list(cache[1]))
    C = bg.T @ bg / bg.shape[0]
    M = torch.linalg.inv(C + 1e-2 * float(torch.trace(C)) / C.shape[0] * torch.eye(C.shape[0]))
    # dW = D (Kf^T M Kf)^-1 Kf^T M: exactly d_i at each forced key, least energy on the background
    A = torch.linalg.solve(Kf.T @ M @ Kf, Kf.T @ M)  # (r, in)
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
                 margin: float = 3.0, whole_target: bool = True) -> Path:
    """Compute the edit of ``facts`` and write it as a LoRA folder."""
    A, B, module = fact_delta(model, tok, facts, margin, whole_target=whole_target)
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
