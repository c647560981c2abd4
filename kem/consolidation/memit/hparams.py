"""MEMIT hyperparameters and per-model presets (numbers only)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kem.consolidation.shared.hparams import SpreadHParams


class MemitHParams(SpreadHParams):
    """Hyperparameters of MEMIT."""

    mom2_update_weight: float = Field(3000.0, gt=0, description="lambda: weight of preserved keys (C) against new keys.")
    ridge: float = Field(1e-3, ge=0, description="Ridge added to C, relative to its mean diagonal.")


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layers": (3, 4, 5, 6, 7), "mom2_update_weight": 3000.0},
}
