"""Which per-model preset applies to a model: a preset is chosen by config signature, and holds numbers only."""

from __future__ import annotations

from typing import Any

# (model_type, num_hidden_layers, hidden_size) -> preset name used by each method's PRESETS table.
SIGNATURES: dict[tuple[str, int, int], str] = {
    ("llama", 30, 576): "smollm2-135m",
}


def preset_name(model: Any) -> str | None:
    """The preset name for ``model`` (or its config), or None when no preset matches."""
    config = getattr(model, "config", model)
    sig = (
        str(getattr(config, "model_type", "")),
        int(getattr(config, "num_hidden_layers", 0) or 0),
        int(getattr(config, "hidden_size", 0) or 0),
    )
    return SIGNATURES.get(sig)
