"""Architecture facts, in one table keyed by ``config.model_type``.

Every method finds the edited matrix (the MLP output projection, whose input is the MLP "key"),
the layer list, the final norm and the LM head through :func:`arch_for`; nothing else in
``kem.consolidation`` spells a module path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kem.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family (dotted, relative to the model or to one layer).

    Attributes:
        layers: Path of the ``ModuleList`` of transformer blocks, from the model.
        mlp_in: Path of the MLP input projection, from a block (``up_proj`` / ``c_fc``).
        mlp_out: Path of the MLP output projection, from a block: the matrix the methods edit.
            Its input, shape ``(..., d_mlp)``, is the key ``k``; its output, ``(..., d_model)``, the value.
        final_norm: Path of the final norm, from the model.
        lm_head: Path of the output embedding, from the model.
        embed: Path of the input embedding, from the model.
        transposed: True when ``mlp_out.weight`` is stored ``(d_in, d_out)`` (GPT-2's ``Conv1D``).
        residual_mlp: True when a block adds its MLP output straight to the residual stream (no norm
            after the MLP, unlike Gemma 2/3): a change of the MLP output is then a change of the
            block output, which lets FT-L replay the blocks before the edited one from a cache.
    """

    layers: str
    mlp_in: str
    mlp_out: str
    final_norm: str
    lm_head: str
    embed: str
    transposed: bool = False
    residual_mlp: bool = True

    def mlp_out_param(self, layer: int) -> str:
        """Name of the edited weight in ``model.named_parameters()``, e.g. ``model.layers.5.mlp.down_proj.weight``."""
        return f"{self.layers}.{layer}.{self.mlp_out}.weight"


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    mlp_in="mlp.up_proj",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)

_GEMMA_TEXT = replace(_LLAMA_LIKE, residual_mlp=False)  # post-feedforward norm

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": replace(_LLAMA_LIKE, mlp_in="mlp.gate_up_proj"),  # gate and up fused in one matrix
    "gemma2": _GEMMA_TEXT,
    "gemma3_text": _GEMMA_TEXT,
    "gemma3": ArchSpec(
        layers="model.language_model.layers",
        mlp_in="mlp.up_proj",
        mlp_out="mlp.down_proj",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        embed="model.language_model.embed_tokens",
        residual_mlp=False,
    ),
    "gpt2": ArchSpec(
        layers="transformer.h",
        mlp_in="mlp.c_fc",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        transposed=True,
    ),
}


def arch_for(model_or_config: Any) -> ArchSpec:
    """The :class:`ArchSpec` for a model (or its config).

    Raises:
        ModelError: the ``model_type`` is not in :data:`ARCHITECTURES`.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(str(model_type))
    if spec is None:
        raise ModelError(
            f"config.model_type {model_type!r} has no entry in kem.consolidation.arch.ARCHITECTURES "
            f"(known: {', '.join(sorted(ARCHITECTURES))}); add one with its module paths"
        )
    if model_type == "gemma3" and not _has(model_or_config, spec.layers):
        return _GEMMA_TEXT  # Gemma3ForCausalLM (text only) keeps the llama-style paths
    return spec


def _has(model: Any, path: str) -> bool:
    if not hasattr(model, "get_submodule"):
        return True
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def num_layers(model: Any) -> int:
    """Number of transformer blocks."""
    return len(model.get_submodule(arch_for(model).layers))


def mlp_out_module(model: Any, layer: int) -> Any:
    """The edited module (``down_proj`` / ``c_proj``) of block ``layer``."""
    spec = arch_for(model)
    return model.get_submodule(f"{spec.layers}.{layer}.{spec.mlp_out}")


def layer_module(model: Any, layer: int) -> Any:
    """Transformer block ``layer``."""
    return model.get_submodule(arch_for(model).layers)[layer]
