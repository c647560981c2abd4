"""FT-L (Zhu et al., 2020): fine-tune one layer's MLP output matrix with an L-infinity norm constraint."""

from __future__ import annotations

from kem.consolidation.ftl.hparams import PRESETS, FtlHParams
from kem.consolidation.ftl.main import compute_ftl
from kem.consolidation.method_registry import register_method

SPEC = register_method("ft-l", FtlHParams, compute_ftl, PRESETS)

__all__ = ["SPEC", "FtlHParams", "compute_ftl"]
