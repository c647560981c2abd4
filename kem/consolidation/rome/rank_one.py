"""ROME step 3: the rank-one insertion ``delta_W = r (C^-1 k*)^T / (k*^T C^-1 k*)``, mapping ``k*`` to ``W k* + r``."""

from __future__ import annotations

import torch

from kem.consolidation.shared.linalg import regularised


def rank_one_update(cov: torch.Tensor, key: torch.Tensor, resid: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ROME's update.

    Args:
        cov: ``(d_mlp, d_mlp)`` second moment ``C`` of the keys.
        key: ``(d_mlp,)`` the averaged key ``k*`` (R-ROME: the same ``k*`` in numerator and denominator).
        resid: ``(d_model,)`` what the update must add at ``k*`` (``v* - W k*``).

    Returns:
        ``(a, b)``: ``a`` ``(d_model, 1)``, ``b`` ``(1, d_mlp)``, ``delta_W = a @ b``.
    """
    c = regularised(cov.to(key.device), ridge)
    k = key.double()
    u = torch.linalg.solve(c, k)  # C^-1 k*
    b = (u / (u @ k))[None, :]
    return resid.float()[:, None], b.float()
