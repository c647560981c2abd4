"""AlphaEdit (Fang et al., 2025): MEMIT with the update projected onto the null space of preserved keys."""

from __future__ import annotations

from kem.consolidation.alphaedit.hparams import PRESETS, AlphaEditHParams
from kem.consolidation.alphaedit.main import compute_alphaedit
from kem.consolidation.alphaedit.state import AlphaEditState
from kem.consolidation.method_registry import register_method

SPEC = register_method("alphaedit", AlphaEditHParams, compute_alphaedit, PRESETS, state_cls=AlphaEditState)

__all__ = ["SPEC", "AlphaEditHParams", "AlphaEditState", "compute_alphaedit"]
