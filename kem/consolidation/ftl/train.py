"""FT-L step 1: Adam on a dense ``delta_W`` of one layer, clamped to ``[-eps, eps]`` after every step
(the norm constraint), on the edits' target NLL.

The blocks before the edited one never change, so each step replays them from a cache and runs only
the later blocks (:class:`~kem.consolidation.shared.tail.TailRunner`); on architectures where that is
not exact (a norm after the MLP) ``delta_W`` is added through a forward hook on full passes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kem.consolidation.arch import arch_for, mlp_out_module
from kem.consolidation.ftl.hparams import FtlHParams
from kem.consolidation.shared.tail import TailRunner, tail_supported
from kem.consolidation.shared.values import TargetBatch
from kem.edit import Edit

log = logging.getLogger(__name__)


def train_layer(model: Any, tok: Any, edits: Sequence[Edit], templates: Sequence[str], hp: FtlHParams) -> tuple[torch.Tensor, int, list[float]]:
    """Fine-tune ``delta_W`` of ``hp.layer``.

    Returns:
        ``(delta_W, steps, probs)``: ``delta_W`` ``(d_model, d_mlp)`` float32 in math layout.
    """
    device = next(model.parameters()).device
    module = mlp_out_module(model, hp.layer)
    w = module.weight
    shape = w.shape if not arch_for(model).transposed else (w.shape[1], w.shape[0])
    dw = torch.zeros(shape, device=device, requires_grad=True)
    tb = TargetBatch(tok, edits, templates, device, kl=False, prefix=False)  # dW changes every token

    def change(key: torch.Tensor) -> torch.Tensor:
        return key.float() @ dw.T

    def hook(mod: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out + change(args[0]).to(out.dtype)

    if tail_supported(model):
        runner = TailRunner(model, hp.layer, tb.ids, tb.mask)
        handle = None
    else:
        runner = None
        handle = module.register_forward_hook(hook)
    opt = torch.optim.Adam([dw], lr=hp.lr)
    base = model.base_model
    head = model.get_output_embeddings()
    probs = torch.zeros(len(edits))
    step = 0
    try:
        for step in range(hp.steps + 1):
            hidden = runner.hidden(change) if runner is not None else tb.hidden(base)
            nll, p = tb.nll(hidden, head)
            probs = p.cpu()
            if bool((probs >= hp.stop_prob).all()) or step == hp.steps:
                break
            (grad,) = torch.autograd.grad(nll.mean(), [dw])
            opt.zero_grad()
            dw.grad = grad
            opt.step()
            with torch.no_grad():
                dw.clamp_(-hp.norm_constraint, hp.norm_constraint)
    finally:
        if handle is not None:
            handle.remove()
    log.debug("FT-L layer %d: %d steps, probs %s", hp.layer, step, probs.tolist())
    return dw.detach(), step, probs.tolist()
