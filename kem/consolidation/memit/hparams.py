"""MEMIT hyperparameters and per-model presets (numbers only)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kem.consolidation.shared.values import ValueOptions


def _memit_values() -> ValueOptions:
    return ValueOptions(norm_ref="block", clamp_factor=0.75)


class MemitHParams(BaseModel):
    """Hyperparameters of MEMIT."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[int, ...] = Field((3, 4, 5, 6, 7), min_length=1, description="Edited blocks; the target is set at the last.")
    context_templates: int = Field(4, ge=0, le=64, description="Generated prefixes keys and values are averaged over.")
    template_length: int = Field(8, ge=1, le=64, description="Tokens per generated prefix.")
    values: ValueOptions = Field(default_factory=_memit_values, description="Target-value optimisation.")
    mom2_samples: int = Field(1000, ge=1, description="Corpus texts for the key covariance.")
    mom2_max_tokens: int = Field(128, ge=8, description="Tokens per covariance text.")
    mom2_update_weight: float = Field(3000.0, gt=0, description="lambda: weight of preserved keys (C) against new keys.")
    ridge: float = Field(1e-3, ge=0, description="Ridge added to C, relative to its mean diagonal.")

    @field_validator("layers")
    @classmethod
    def _sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"must be distinct non-negative layer indices (got {v})")
        return tuple(sorted(v))


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"layers": (3, 4, 5, 6, 7), "mom2_update_weight": 3000.0},
}
