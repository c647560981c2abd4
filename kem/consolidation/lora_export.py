"""A :class:`~kem.consolidation.delta.WeightDelta` as a peft LoRA adapter, and adapters combined into one.

LoRA adds ``scaling * B @ A`` to a Linear weight (``W``: ``(out, in)``; ``A``: ``(r, in)``;
``B``: ``(out, r)``; ``scaling = lora_alpha / r``). A delta stores ``delta_W = a @ b`` in the weight's
layout (``a``: ``(out, k)``, ``b``: ``(k, in)``) for ROME (k = 1 per edit), MEMIT and AlphaEdit
(k = edits per layer), and a dense ``delta_W`` for FT-L. :func:`lora_factors` turns either into an
SVD-balanced pair (``B = U sqrt(S)``, ``A = sqrt(S) V^T``), exact when the numerical rank fits
``max_rank`` and truncated to the ``max_rank`` largest singular values beyond it, with the truncation's
relative Frobenius error (exact: from the dropped singular values). Every module gets its own rank
(peft's ``rank_pattern``) and ``lora_alpha = rank`` (``alpha_pattern``), so ``scaling = 1``: peft,
vLLM (0.32 reads both patterns, ``vllm/lora/peft_helper.py``) and :class:`kem.follower.lora.LoraHooks`
compute the same ``W + B @ A``.

:func:`combine_loras` writes one adapter holding several: modules in both get their ranks
concatenated (``[s1 B1, s2 B2] @ [A1; A2] = s1 B1 A1 + s2 B2 A2``, each part's scaling folded into its
``B``), target modules are the union. A tenant's delta plus the edit-follower make one adapter, so one
LoRA per request serves both.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kem.consolidation.delta import Factors, WeightDelta
from kem.errors import ModelError, ValidationError

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: Singular values below ``RANK_TOL * s_max`` are numerical noise (float32's epsilon is 1.2e-7).
RANK_TOL = 1e-6


@dataclass
class ModuleExport:
    """How one module's update became LoRA factors.

    Attributes:
        module: Module name (``model.layers.7.mlp.down_proj``).
        rank: Rank written.
        full_rank: Numerical rank of the update (singular values above ``RANK_TOL * s_max``).
        rel_error: ``||delta_W - B A||_F / ||delta_W||_F`` (0 up to float error when ``rank == full_rank``).
    """

    module: str
    rank: int
    full_rank: int
    rel_error: float


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote: per-module ranks and errors, the folder and its size."""

    path: Path
    modules: list[ModuleExport] = field(default_factory=list)
    nbytes: int = 0

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    @property
    def truncated(self) -> bool:
        return any(m.rank < m.full_rank for m in self.modules)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for a manifest."""
        return {"modules": len(self.modules), "ranks": {m.module: m.rank for m in self.modules},
                "full_ranks": {m.module: m.full_rank for m in self.modules},
                "max_rel_error": self.max_rel_error, "truncated": self.truncated, "bytes": self.nbytes}


def lora_factors(f: Factors, max_rank: int, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """LoRA factors of one update.

    Args:
        f: The update in the parameter's layout (``(out, in)`` for Linear; ``(in, out)`` when ``transposed``,
            GPT-2's Conv1D).
        max_rank: Most components kept.
        transposed: The parameter stores ``(in, out)``.

    Returns:
        ``(B, A, full_rank, rel_error)``: ``B`` ``(out, r)``, ``A`` ``(r, in)`` float32 with
        ``B @ A`` ≈ ``delta_W`` in Linear layout, the update's numerical rank, and the relative Frobenius
        error of the truncation.
    """
    if max_rank < 1:
        raise ValidationError(f"max_rank must be >= 1 (got {max_rank})", field="max_rank")
    if f.b is None:
        dense = f.a.double()
        if transposed:
            dense = dense.T
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    else:
        a, b = (f.b.T, f.a.T) if transposed else (f.a, f.b)  # Linear layout: a (out, k), b (k, in)
        qa, ra = torch.linalg.qr(a.double())  # (out, k), (k, k)
        qb, rb = torch.linalg.qr(b.double().T)  # (in, k), (k, k)
        um, s, vhm = torch.linalg.svd(ra @ rb.T)  # delta = qa um diag(s) vhm qb^T
        u, vh = qa @ um, vhm @ qb.T
    total = float((s**2).sum())
    full = int((s > RANK_TOL * s[0]).sum()) if total > 0 else 0
    r = max(1, min(full, max_rank))
    err = math.sqrt(float((s[r:] ** 2).sum()) / total) if total > 0 else 0.0
    root = s[:r].sqrt()
    big_b = (u[:, :r] * root).float().contiguous()
    big_a = (root[:, None] * vh[:r]).float().contiguous()
    return big_b, big_a, max(full, 1), err


def export_lora(delta: WeightDelta, folder: str | Path, *, base_model: str, max_rank: int = 64,
                   transposed: bool = False, dtype: torch.dtype = torch.float32) -> LoraExport:
    """Write ``delta`` as a peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        delta: Updates of module weights (``<module>.weight``).
        folder: Where to write (created).
        base_model: ``base_model_name_or_path`` recorded in the config.
        max_rank: Per-module rank limit (the serving engine's ``max_lora_rank``); larger updates are
            truncated by SVD and their error recorded.
        transposed: The model stores these weights ``(in, out)`` (GPT-2 Conv1D): ``fan_in_fan_out``.
        dtype: Tensor dtype in the file.

    Raises:
        ValidationError: an update is not a module's ``weight``, or the delta is empty.
    """
    if not delta.updates:
        raise ValidationError("the delta has no updates: nothing to export as an adapter", field="updates")
    tensors: dict[str, torch.Tensor] = {}
    out = LoraExport(Path(folder))
    for name, f in sorted(delta.updates.items()):
        module, _, pname = name.rpartition(".")
        if pname != "weight" or not module:
            raise ValidationError(f"an adapter can carry module weights only (got {name!r})", field="updates")
        big_b, big_a, full, err = lora_factors(f, max_rank, transposed)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = big_a.to(dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = big_b.to(dtype)
        out.modules.append(ModuleExport(module, big_a.shape[0], full, err))
        if big_a.shape[0] < full:
            log.warning("adapter: %s has rank %d > max_rank %d; truncated (relative error %.2e)",
                        module, full, max_rank, err)
    _write(out.path, tensors, {m.module: m.rank for m in out.modules}, base_model, fan_in_fan_out=transposed)
    out.nbytes = sum(p.stat().st_size for p in out.path.iterdir())
    return out


def _write(folder: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int], base_model: str,
           fan_in_fan_out: bool = False) -> None:
    """The config (peft's ``LoraConfig``, scaling 1 per module) and the weights."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != common}
    config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(ranks), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_model)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})


def read_lora(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (B * scaling, A)}`` of a peft LoRA folder, float32 (scaling per module from ``r``,
    ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, matched as peft does)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the LoRA adapter in {folder}: {exc}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA" or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
        raise ModelError(f"{folder}: only plain LoRA adapters on Linear modules can be combined")
    r0, alpha0, rs = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"])), bool(cfg.get("use_rslora"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for which in ("lora_A", "lora_B"):
            suffix = f".{which}.weight"
            if key.endswith(suffix):
                mod = key[: -len(suffix)].removeprefix(PREFIX)
                parts.setdefault(mod, {})[which] = t.float()
    out = {}
    for mod, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ModelError(f"{folder}: {mod} has only one of lora_A / lora_B")
        r = int(_pattern(cfg.get("rank_pattern") or {}, mod, r0))
        alpha = float(_pattern(cfg.get("alpha_pattern") or {}, mod, alpha0))
        scale = alpha / math.sqrt(r) if rs else alpha / r
        out[mod] = (ab["lora_B"] * scale, ab["lora_A"])
    return out


def _pattern(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """peft's ``get_pattern_key`` rule (vLLM's too): a key matches a module name it ends at a ``.``
    boundary; the first match wins; else ``default``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def combine_loras(folders: Sequence[str | Path], out: str | Path, *, base_model: str) -> Path:
    """One LoRA folder computing the sum of ``folders``' adapters (ranks concatenated per module, the
    union of target modules, scaling 1), float32.

    Raises:
        ModelError: a folder is not a plain LoRA adapter, or two disagree on a module's shape.
    """
    merged: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for folder in folders:
        for mod, (b, a) in read_lora(folder).items():
            bs, as_ = merged.setdefault(mod, ([], []))
            if bs and (bs[0].shape[0] != b.shape[0] or as_[0].shape[1] != a.shape[1]):
                raise ModelError(f"adapters disagree on {mod}'s shape: {tuple(bs[0].shape)} vs {tuple(b.shape)}")
            bs.append(b)
            as_.append(a)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for mod, (bs, as_) in sorted(merged.items()):
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = torch.cat(bs, 1)
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = torch.cat(as_, 0)
        ranks[mod] = sum(a.shape[0] for a in as_)
    _write(Path(out), tensors, ranks, base_model)
    return Path(out)
