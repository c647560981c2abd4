"""Reading activations at the subject's last token: MLP keys (inputs of the edited matrix) and block outputs.

The forward pass stops after the last layer needed (a hook raises :class:`_Stop`), so reading the
keys of layer 5 of a 30-layer model costs a sixth of a forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kem.consolidation.arch import layer_module, mlp_out_module
from kem.consolidation.shared.prompts import Row, pad, pad_id


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def gather(
    model: Any,
    tok: Any,
    rows: Sequence[Row],
    key_layers: Sequence[int] = (),
    out_layers: Sequence[int] = (),
    batch_size: int = 32,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys and block outputs at each row's subject position.

    Args:
        rows: Prompt rows (see :func:`kem.consolidation.shared.prompts.make_rows`).
        key_layers: Layers whose MLP key (input of ``mlp_out``) to read.
        out_layers: Layers whose block output (residual stream) to read.
        batch_size: Rows per forward pass.

    Returns:
        ``(keys, outs)``: layer -> float32 tensor ``(len(rows), d_mlp)`` / ``(len(rows), d_model)``.
    """
    device = next(model.parameters()).device
    last = max([*key_layers, *out_layers])
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
    outs: dict[int, list[torch.Tensor]] = {layer: [] for layer in out_layers}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = pad(chunk, pad_id(tok), device)
        pos = torch.tensor([r.subject_pos for r in chunk], device=device)
        sel = torch.arange(len(chunk), device=device)
        with _reading(model, keys, outs, sel, pos, last):
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
    return ({k: torch.cat(v) for k, v in keys.items()}, {k: torch.cat(v) for k, v in outs.items()})


@contextlib.contextmanager
def _reading(
    model: Any,
    keys: dict[int, list[torch.Tensor]],
    outs: dict[int, list[torch.Tensor]],
    sel: torch.Tensor,
    pos: torch.Tensor,
    last: int,
) -> Iterator[None]:
    handles = []

    def key_hook(layer: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            keys[layer].append(args[0][sel, pos].float())
            if layer == last and layer not in outs:
                raise _Stop

        return hook

    def out_hook(layer: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], out: Any) -> None:
            outs[layer].append(_first(out)[sel, pos].float())
            if layer == last:
                raise _Stop

        return hook

    try:
        for layer in keys:
            handles.append(mlp_out_module(model, layer).register_forward_pre_hook(key_hook(layer)))
        for layer in outs:
            handles.append(layer_module(model, layer).register_forward_hook(out_hook(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def mean_per_edit(x: torch.Tensor, rows: Sequence[Row], n_edits: int) -> torch.Tensor:
    """Average row vectors ``(len(rows), d)`` over each edit's rows -> ``(n_edits, d)``."""
    idx = torch.tensor([r.edit for r in rows], device=x.device)
    total = torch.zeros(n_edits, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, idx, x)
    count = torch.bincount(idx, minlength=n_edits).clamp(min=1).to(x.dtype)
    return total / count[:, None]
