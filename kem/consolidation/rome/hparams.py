"""ROME hyperparameters and per-model presets (numbers only)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kem.consolidation.shared.values import ValueOptions


class RomeHParams(BaseModel):
    """Hyperparameters of ROME."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(5, ge=0, description="Block whose MLP output matrix is edited.")
    context_templates: int = Field(4, ge=0, le=64, description="Generated prefixes the key and value are averaged over.")
    template_length: int = Field(8, ge=1, le=64, description="Tokens per generated prefix.")
    values: ValueOptions = Field(default_factory=ValueOptions, description="Target-value optimisation.")
    mom2_samples: int = Field(1000, ge=1, description="Corpus texts for the key covariance.")
    mom2_max_tokens: int = Field(128, ge=8, description="Tokens per covariance text.")
    ridge: float = Field(1e-3, ge=0, description="Ridge added to C, relative to its mean diagonal.")


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layer": 5, "context_templates": 4, "values": {"steps": 25, "lr": 1.0}},
}
