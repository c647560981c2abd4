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


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layer": 20, "lr": 5e-4, "norm_constraint": 5e-3, "steps": 25},
}
