"""AlphaEdit hyperparameters and per-model presets (numbers only)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kem.consolidation.shared.hparams import SpreadHParams


class AlphaEditHParams(SpreadHParams):
    """Hyperparameters of AlphaEdit (the key covariance defines the null space that is preserved)."""

    nullspace_threshold: float = Field(
        1e-2, gt=0, description="Eigenvalues of C below this fraction of the largest span the preserved keys' null space."
    )
    l2: float = Field(10.0, gt=0, description="Ridge on the projected normal equations (AlphaEdit's L2).")


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layers": (3, 4, 5, 6, 7), "nullspace_threshold": 1e-2, "l2": 10.0},
}
