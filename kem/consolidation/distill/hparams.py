"""distill hyperparameters and per-model presets (numbers only)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DistillHParams(BaseModel):
    """Hyperparameters of ``distill``: a LoRA on a few MLP layers, trained without context to answer as
    the fast path does (teacher) while keeping the parent's distributions on unrelated prompts (retain),
    then merged into the weights as a low-rank :class:`~kem.consolidation.delta.WeightDelta`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    anchor: str = Field("subject", pattern="^(subject|free)$",
                        description="subject: the update's input directions are the edited subjects' keys, whitened "
                                    "by the key covariance (ROME's k*), and only its output directions are "
                                    "trained; free: a plain LoRA (both factors trained) on targets.")
    start: str = Field("memit", description="A registered method whose delta distill starts from and then corrects "
                                           "(e.g. memit: its clozes, then distill's other forms); none: from the parent.")
    mom2_samples: int = Field(300, ge=1, description="Corpus texts for the key covariance (anchor=subject, and the "
                                                     "start method's; quality is flat from 100 on, docs/consolidation.md).")
    mom2_max_tokens: int = Field(128, ge=8, description="anchor=subject: tokens per covariance text.")
    key_ridge: float = Field(1e-2, ge=0, description="anchor=subject: ridge added to C, relative to its mean diagonal.")
    layers: tuple[int, ...] | None = Field(None, description="Decoder layers whose MLP output matrix (anchor=subject) "
                                                             "or targets (anchor=free) are updated (None: the "
                                                             "lower-middle third of the model).")
    targets: tuple[str, ...] = Field(("gate_proj", "up_proj", "down_proj"),
                                     description="anchor=free: Linear module names (last part) inside those layers.")
    rank: int = Field(8, ge=1, le=256, description="anchor=free: LoRA rank per module (subject: one per edit).")
    alpha: float = Field(16.0, gt=0, description="anchor=free: LoRA scaling numerator (scale = alpha / rank).")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate (constant after a short warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_steps: int = Field(300, ge=1, le=100_000, description="Optimiser steps at most.")
    min_steps: int = Field(40, ge=0, le=100_000, description="Steps a small job may take even beyond max_epochs "
                                                            "(a few edits make one short epoch).")
    min_epochs: float = Field(1.0, ge=0, description="Passes over the edit examples before early stopping may stop.")
    max_epochs: float = Field(6.0, gt=0, description="Passes over the edit examples at most.")
    edit_batch: int = Field(16, ge=1, le=512, description="Edit examples per step.")
    retain_batch: int = Field(16, ge=0, le=512, description="Retain examples per step.")
    stop_prob: float = Field(0.9, gt=0, le=1.0, description="An answer token whose probability already exceeds this "
                                                         "adds no loss (no over-training, less drift).")
    kl_weight: float = Field(1.0, ge=0, description="Weight of the retain KL against the edits' answer loss.")
    change_weight: float = Field(10.0, ge=0, description="Weight of the LoRA's relative output change on the retain "
                                                         "rows (every token, every module).")
    kl_top_k: int = Field(64, ge=1, le=4096, description="The parent's distributions are kept as their top-k tokens "
                                                         "plus one bin for the rest.")
    prefixes: int = Field(4, ge=0, le=32, description="Generated context prefixes the cloze is also trained behind.")
    prefix_length: int = Field(8, ge=1, le=64, description="Tokens per generated prefix.")
    retain_same_relation: int = Field(4, ge=0, le=64, description="Retain facts per edit of other subjects with a "
                                                                  "similar relation.")
    retain_random: int = Field(2, ge=0, le=64, description="Random retain facts per edit.")
    retain_same_subject: int = Field(2, ge=0, le=64, description="Other relations of the edited subject, per edit.")
    retain_chat: int = Field(1, ge=0, le=16, description="Chat questions about retain facts, per edit.")
    retain_tokens: int = Field(6, ge=1, le=64, description="Parent tokens generated per retain completion.")
    chat_tokens: int = Field(32, ge=4, le=256, description="Tokens generated per chat answer (teacher and retain).")
    teacher: bool = Field(True, description="Label the forms with the fast path's answers (edit-follower + fact in "
                                            "context); False: the fact sentence / target alone.")
    seed: int = Field(0, description="Sampling seed.")

    @field_validator("start")
    @classmethod
    def _start(cls, v: str) -> str:
        v = v.strip().lower()
        if v == "none":
            return v
        if v == "distill":
            raise ValueError("distill cannot start from itself (use a weight-editing method such as memit, or none)")
        from kem.consolidation.method_registry import list_methods

        if v not in list_methods():
            raise ValueError(f"unknown method {v!r} (known: none, {', '.join(m for m in list_methods() if m != 'distill')})")
        return v


# SmolLM2-135M (30 layers), bench/bench_weights_alone.py --n 20 (docs/consolidation.md): a plain LoRA on
# the MLPs of layers 2-11 changed 70-90% of unrelated answers whatever its lr / KL weight; anchored on the
# subjects' keys at lr 5e-3 it learnt nothing, at 5e-2 it drifted (KL 0.5); started from MEMIT at 1e-2:
# 100 / 60 / 88.9 / 75 / 87.5 (rel / paraphrase / question / neighbourhood / probes) vs MEMIT's
# 100 / 50 / 72.2 / 75 / 82.5. MEMIT's layers.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layers": (3, 4, 5, 6, 7)},
}
