"""distill: consolidate by distilling kem's own fast path into the weights.

The teacher is the served fast path (the parent + the edit-follower + the fact in context); the
student is the parent with no context, trained on the teacher's answers to every form of each edit
(cloze, paraphrases, chat question) while keeping the parent's distributions on unrelated facts
(Padmanabhan et al. 2023, distilling in-context updates; Gangadhar & Stratos 2024, fine-tuning with
paraphrases and random unedited facts). The LoRA is merged as a low-rank delta.
"""

from __future__ import annotations

from kem.consolidation.distill.hparams import PRESETS, DistillHParams
from kem.consolidation.distill.main import compute_distill
from kem.consolidation.method_registry import register_method

SPEC = register_method("distill", DistillHParams, compute_distill, PRESETS)

__all__ = ["SPEC", "DistillHParams", "compute_distill"]
