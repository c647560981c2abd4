"""Small linear-algebra steps shared by the methods, done in float32 or better whatever the model dtype."""

from __future__ import annotations

from typing import Any

import torch

from kem.consolidation.arch import arch_for
from kem.consolidation.delta import WeightDelta


def add_layer_update(delta: WeightDelta, model: Any, layer: int, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """Add ``a @ b`` (math layout ``(d_model, d_mlp)``: value = W key) to layer ``layer``'s edited matrix.

    GPT-2's ``Conv1D`` stores the transpose, so the factors are swapped and transposed there.
    """
    spec = arch_for(model)
    name = spec.mlp_out_param(layer)
    if spec.transposed:
        if b is None:
            delta.add(name, a.T)
        else:
            delta.add(name, b.T, a.T)
    else:
        delta.add(name, a, b)


def regularised(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """``cov + ridge * mean(diag(cov)) * I`` in float64 (for well-posed solves)."""
    c = cov.double()
    return c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def memit_solve(cov: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, weight: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's batch update ``delta_W = R K^T (lambda C + K K^T)^-1`` as low-rank factors.

    Args:
        cov: ``(d_mlp, d_mlp)`` second moment of the keys.
        keys: ``(n, d_mlp)`` keys of the edits.
        resid: ``(n, d_model)`` residuals each key must add.
        weight: ``lambda``, how much the preserved keys weigh against the new ones.

    Returns:
        ``(a, b)`` with ``delta_W = a @ b``: ``a = R^T`` ``(d_model, n)``, ``b`` ``(n, d_mlp)``.
    """
    k = keys.double()
    lhs = weight * regularised(cov, ridge) + k.T @ k
    b = torch.linalg.solve(lhs, k.T).T  # (n, d_mlp), lhs symmetric
    return resid.T.float(), b.float()
