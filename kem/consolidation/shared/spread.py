"""MEMIT's multi-layer loop, shared by MEMIT and AlphaEdit.

1. target: ``z_i = h_L(i) + delta_i`` at the last edited layer ``L`` (shared value optimiser);
2. for each edited layer ``l`` (lowest first), on the model plus the updates so far (forward hooks):
   read the keys ``K_l`` and the current ``h_L``; the residual ``(z - h_L) / (layers left)`` is
   spread over the remaining layers; a method-specific ``solver`` turns ``(l, K_l, R_l)`` into a
   low-rank update of layer ``l``.
Keys and ``h_L`` are averaged over the context templates, consistently (as R-ROME does for ROME).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kem.consolidation.delta import WeightDelta, delta_hooks
from kem.consolidation.shared.linalg import add_layer_update
from kem.consolidation.shared.prompts import make_rows
from kem.consolidation.shared.trace import gather, mean_per_edit
from kem.consolidation.shared.values import ValueOptions, optimise_values
from kem.edit import Edit

log = logging.getLogger(__name__)

# solver(layer, keys (n, d_mlp), resid (n, d_model)) -> (a (d_model, r), b (r, d_mlp))
Solver = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def spread_update(
    model: Any,
    tok: Any,
    edits: Sequence[Edit],
    layers: Sequence[int],
    templates: Sequence[str],
    opts: ValueOptions,
    solver: Solver,
    method: str,
) -> tuple[WeightDelta, dict[int, torch.Tensor], dict[str, Any]]:
    """Run the loop above.

    Returns:
        ``(delta, keys, info)``: the update of every layer; ``keys[l]`` ``(n, d_mlp)`` as read while
        editing layer ``l``; info with target probabilities and timings.
    """
    layers = sorted(layers)
    last = layers[-1]
    t0 = time.perf_counter()
    values = optimise_values(model, tok, edits, last, templates, opts)
    t_values = time.perf_counter() - t0
    rows = make_rows(tok, edits, templates, with_target=False)
    _, outs = gather(model, tok, rows, out_layers=[last])
    target = mean_per_edit(outs[last], rows, len(edits)) + values.delta.to(outs[last].device)
    delta = WeightDelta(method=method)
    all_keys: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        with delta_hooks(model, delta if delta.updates else None):
            keys, outs = gather(model, tok, rows, key_layers=[layer], out_layers=[last])
        k = mean_per_edit(keys[layer], rows, len(edits))
        cur = mean_per_edit(outs[last], rows, len(edits))
        resid = (target - cur) / (len(layers) - i)
        a, b = solver(layer, k, resid)
        add_layer_update(delta, model, layer, a, b)
        all_keys[layer] = k
        log.debug("layer %d: residual norm %.3f, update norm %.3f", layer, float(resid.norm()), float((a @ b).norm()))
    info = {
        "target_probs": values.probs.tolist(),
        "value_steps": values.steps,
        "seconds": {"values": t_values, "layers": time.perf_counter() - t0 - t_values},
    }
    return delta, all_keys, info
