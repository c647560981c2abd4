"""AlphaEdit step 2: the projected update ``delta_W = R [(P (K^T K + K_p^T K_p) + a I)^-1 P K^T]^T``.

With ``P`` projecting onto the null space of the preserved keys, ``delta_W k0 ~ 0`` for them; adding
the past edits' ``K_p^T K_p`` keeps new updates from overwriting earlier ones.
"""

from __future__ import annotations

import torch


def alphaedit_layer_update(
    proj: torch.Tensor, past: torch.Tensor | None, keys: torch.Tensor, resid: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of one layer's update.

    Args:
        proj: ``(d_mlp, d_mlp)`` null-space projector ``P``.
        past: ``(d_mlp, d_mlp)`` ``K_p^T K_p`` of earlier edits, or None.
        keys: ``(n, d_mlp)`` keys ``K`` of this batch.
        resid: ``(n, d_model)`` residuals ``R``.
        l2: Ridge ``a``.

    Returns:
        ``(a (d_model, n), b (n, d_mlp))`` with ``delta_W = a @ b``.
    """
    dev = keys.device
    p = proj.to(dev)
    k = keys.double()
    gram = k.T @ k
    if past is not None:
        gram = gram + past.to(dev)
    lhs = p @ gram + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=dev)
    x = torch.linalg.solve(lhs, p @ k.T)  # (d_mlp, n)
    return resid.T.float(), x.T.float()
