"""AlphaEdit's running state: null-space projectors and the keys of edits already made.

Kept in ``EditContext.state["alphaedit"]``, so sequential batches see earlier keys; registered as the
method's ``state_cls``, so the consolidation job carries it from one model version to the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch


@dataclass
class AlphaEditState:
    """Per layer: projector ``P`` ``(d_mlp, d_mlp)`` onto the null space of ``C``, and ``sum K_p^T K_p`` of past edits."""

    file_name: ClassVar[str] = "alphaedit_state.safetensors"  # in a model version's folder
    projectors: dict[int, torch.Tensor] = field(default_factory=dict)
    past: dict[int, torch.Tensor] = field(default_factory=dict)
    edits: int = 0

    def forget_edits(self) -> None:
        """Drop the past edits' keys (their updates were reverted); the projectors stay valid: they
        depend only on the base model's covariance statistics."""
        self.past.clear()
        self.edits = 0

    def add_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Remember ``keys`` ``(n, d_mlp)`` of layer ``layer`` (after their update is computed)."""
        k = keys.double().cpu()
        self.past[layer] = self.past.get(layer, torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64)) + k.T @ k

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"P{k}": v for k, v in self.projectors.items()} | {f"K{k}": v for k, v in self.past.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"edits": str(self.edits)})

    @classmethod
    def load(cls, path: str | Path) -> AlphaEditState:
        from safetensors import safe_open

        st = cls()
        with safe_open(str(path), framework="pt") as fh:
            st.edits = int((fh.metadata() or {}).get("edits", 0))
            for key in fh.keys():
                target = st.projectors if key[0] == "P" else st.past
                target[int(key[1:])] = fh.get_tensor(key)
        return st
