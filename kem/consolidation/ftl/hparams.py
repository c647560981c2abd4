"""FT-L hyperparameters and per-model presets (numbers only)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FtlHParams(BaseModel):
    """Hyperparameters of FT-L."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(20, ge=0, description="Block whose MLP output matrix is fine-tuned.")
    steps: int = Field(25, ge=1, le=1000, description="Maximum Adam steps.")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate.")
    norm_constraint: float = Field(5e-3, gt=0, description="Each weight moves at most this far (L-infinity).")
    stop_prob: float = Field(0.9, gt=0, le=1.0, description="Stop once every edit's target probability exceeds this.")
    context_templates: int = Field(0, ge=0, le=64, description="Generated prefixes to train on besides the bare prompt.")
    template_length: int = Field(6, ge=1, le=64, description="Tokens per generated prefix.")


# SmolLM2-135M, measured with `kem eval --method ft-l -H ...` on the first 20 CounterFact records
# (docs/consolidation.md): lr 5e-4, norm 5e-3, 25 steps gave EasyEdit-protocol reliability /
# generalization / locality 77.5 / 17.5 / 80.0; lr = norm = 1e-2 x 5 steps 100 / 17.5 / 57.5 at
# a fifth of the time (the constraint saturates within a few steps; 10 steps changed nothing).
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layer": 20, "lr": 1e-2, "norm_constraint": 1e-2, "steps": 5},
}
