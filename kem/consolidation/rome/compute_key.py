"""ROME step 1: the key ``k*``, the MLP key at the subject's last token averaged over context templates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kem.consolidation.shared.prompts import make_rows
from kem.consolidation.shared.trace import gather, mean_per_edit
from kem.edit import Edit


def compute_keys(model: Any, tok: Any, edits: Sequence[Edit], layer: int, templates: Sequence[str]) -> torch.Tensor:
    """``k*`` for each edit, shape ``(len(edits), d_mlp)`` float32 (the forward stops after ``layer``)."""
    rows = make_rows(tok, edits, templates, with_target=False)
    keys, _ = gather(model, tok, rows, key_layers=[layer])
    return mean_per_edit(keys[layer], rows, len(edits))
