"""AlphaEdit step 1: the projector onto the (approximate) null space of the preserved keys' second moment."""

from __future__ import annotations

import torch


def null_space_projector(cov: torch.Tensor, rel_threshold: float) -> torch.Tensor:
    """``P = U_0 U_0^T`` where ``U_0`` are eigenvectors of ``cov`` with eigenvalue below ``rel_threshold * max``.

    Args:
        cov: ``(d, d)`` symmetric second moment ``E[k k^T]``.

    Returns:
        ``(d, d)`` float64 projector; ``K0 P ~ 0`` for preserved keys ``K0``.
    """
    evals, evecs = torch.linalg.eigh(cov.double())
    small = evals < rel_threshold * evals[-1]
    u = evecs[:, small]
    return u @ u.T
