"""Run only the blocks after an edited MLP: the blocks up to ``layer`` are replayed from a cache.

A method that trains an additive change of block ``layer``'s MLP output (FT-L's ``delta_W``) sees
the same inputs to every block up to ``layer`` at every step. :class:`TailRunner` runs the whole
model once, keeps block ``layer``'s output ``h`` and its MLP key ``k`` (the input of the output
projection), and from then on swaps the block list for ``[replay] + blocks[layer + 1:]``, where
``replay`` returns ``h + change(k)``. Each step then pays for the blocks after the edit only
(SmolLM2-135M, layer 20 of 30: about a third of the forward pass).

Exact only when the block adds its MLP output straight to the residual stream
(:attr:`~kem.consolidation.arch.ArchSpec.residual_mlp`); :func:`tail_supported` says so, and
callers fall back to full forward passes otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kem.consolidation.arch import arch_for, mlp_out_module

Change = Callable[[torch.Tensor], torch.Tensor]  # key (rows, width, d_mlp) -> output change (rows, width, d_model)


def tail_supported(model: Any) -> bool:
    """Whether :class:`TailRunner` is exact for ``model``'s architecture."""
    return arch_for(model).residual_mlp


class _Replay(nn.Module):
    """Stands in for blocks ``0..layer``: returns the cached output of block ``layer`` plus the change."""

    def __init__(self, runner: TailRunner, original: nn.Module) -> None:
        super().__init__()
        self._runner = runner
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # read by some models' layer loops
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        r = self._runner
        h = r.block_out + r.change(r.key).to(r.block_out.dtype)
        return (h, *r.block_extra) if r.block_tuple else h


class TailRunner:
    """Final hidden states of ``base(input_ids, attention_mask)`` under an MLP-output change at ``layer``.

    Args:
        model: The causal LM (its block list is swapped only inside :meth:`hidden`).
        layer: The edited block.
        input_ids, attention_mask: The fixed batch every step runs.
    """

    def __init__(self, model: Any, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.model = model
        self.layer = layer
        self.ids = input_ids
        self.mask = attention_mask
        spec = arch_for(model)
        parent_path, _, self._attr = spec.layers.rpartition(".")
        self._parent = model.get_submodule(parent_path) if parent_path else model
        self._blocks: nn.ModuleList = getattr(self._parent, self._attr)
        self.change: Change = lambda k: torch.zeros((), device=k.device)
        self.key, self.block_out, self.block_extra, self.block_tuple = self._capture()
        self._tail = nn.ModuleList([_Replay(self, self._blocks[layer]), *self._blocks[layer + 1 :]])

    @torch.no_grad()
    def _capture(self) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...], bool]:
        seen: dict[str, Any] = {}

        def read_key(mod: Any, args: tuple[Any, ...]) -> None:
            seen["key"] = args[0].detach()

        def read_block(mod: Any, args: Any, out: Any) -> None:
            seen["out"] = out

        handles = [mlp_out_module(self.model, self.layer).register_forward_pre_hook(read_key),
                   self._blocks[self.layer].register_forward_hook(read_block)]
        try:
            self.model.base_model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        out = seen["out"]
        if isinstance(out, tuple):
            return seen["key"], out[0].detach(), tuple(out[1:]), True
        return seen["key"], out.detach(), (), False

    @contextmanager
    def _swapped(self) -> Iterator[None]:
        setattr(self._parent, self._attr, self._tail)
        try:
            yield
        finally:
            setattr(self._parent, self._attr, self._blocks)

    def hidden(self, change: Change) -> torch.Tensor:
        """Final hidden states ``(rows, width, d_model)`` with ``change(key)`` added to block ``layer``'s
        MLP output (differentiable through ``change``); only the embedding lookup and the later blocks run."""
        self.change = change
        with self._swapped():
            return self.model.base_model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).last_hidden_state
