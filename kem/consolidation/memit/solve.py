"""MEMIT step 3: per layer, the batch least-squares update ``delta_W = R K^T (lambda C + K K^T)^-1``."""

from __future__ import annotations

import torch

from kem.consolidation.shared.linalg import memit_solve


def memit_layer_update(
    cov: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, weight: float, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors ``(a (d_model, n), b (n, d_mlp))`` of one layer's update (see :func:`memit_solve`)."""
    return memit_solve(cov.to(keys.device), keys, resid, weight, ridge)
