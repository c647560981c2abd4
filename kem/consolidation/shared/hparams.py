"""Hyperparameters shared by the multi-layer methods (MEMIT, AlphaEdit): numbers only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kem.consolidation.shared.values import ValueOptions


def _spread_values() -> ValueOptions:
    return ValueOptions(norm_ref="block", clamp_factor=0.75)


class SpreadHParams(BaseModel):
    """Layers, context templates, target-value optimisation and key covariance of a method that spreads
    its update over several MLP layers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[int, ...] = Field((3, 4, 5, 6, 7), min_length=1, description="Edited blocks; the target is set at the last.")
    context_templates: int = Field(4, ge=0, le=64, description="Generated prefixes keys and values are averaged over.")
    template_length: int = Field(8, ge=1, le=64, description="Tokens per generated prefix.")
    values: ValueOptions = Field(default_factory=_spread_values, description="Target-value optimisation.")
    mom2_samples: int = Field(1000, ge=1, description="Corpus texts for the key covariance.")
    mom2_max_tokens: int = Field(128, ge=8, description="Tokens per covariance text.")

    @field_validator("layers")
    @classmethod
    def _sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"must be distinct non-negative layer indices (got {v})")
        return tuple(sorted(v))
