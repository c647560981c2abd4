"""MEMIT (Meng et al., 2023): many edits at once, the residual spread over several layers."""

from __future__ import annotations

from kem.consolidation.memit.hparams import PRESETS, MemitHParams
from kem.consolidation.memit.main import compute_memit
from kem.consolidation.method_registry import register_method

SPEC = register_method("memit", MemitHParams, compute_memit, PRESETS)

__all__ = ["SPEC", "MemitHParams", "compute_memit"]
