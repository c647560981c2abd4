"""ROME (Meng et al., 2022) with the R-ROME fix (Gupta et al., 2024): one rank-one update per edit."""

from __future__ import annotations

from kem.consolidation.method_registry import register_method
from kem.consolidation.rome.hparams import PRESETS, RomeHParams
from kem.consolidation.rome.main import compute_rome

SPEC = register_method("rome", RomeHParams, compute_rome, PRESETS)

__all__ = ["SPEC", "RomeHParams", "compute_rome"]
