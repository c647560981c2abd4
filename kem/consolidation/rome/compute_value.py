"""ROME step 2: the value ``v* = W k* + delta``; ``delta`` makes the target likely (shared optimiser)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kem.consolidation.shared.values import ValueOptions, ValueResult, optimise_values
from kem.edit import Edit


def compute_value_delta(
    model: Any, tok: Any, edits: Sequence[Edit], layer: int, templates: Sequence[str], opts: ValueOptions
) -> ValueResult:
    """``delta`` per edit ``(n, d_model)``, added to the MLP output of ``layer`` at the subject's last token.

    With R-ROME's consistent key, the residual the update must produce at ``k*`` is exactly ``delta``:
    the optimisation adds ``delta`` to ``W k_t`` for every template ``t``, whose mean is ``W k*``.
    """
    return optimise_values(model, tok, edits, layer, templates, opts)
