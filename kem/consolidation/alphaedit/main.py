"""AlphaEdit end to end: null-space projector (step 1, :mod:`.projector`), target values and keys
(shared MEMIT loop, :mod:`kem.consolidation.shared.spread`), projected solve (step 2, :mod:`.solve`),
then the batch's keys join the running state (step 3, :mod:`.state`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kem.consolidation.alphaedit.hparams import AlphaEditHParams
from kem.consolidation.alphaedit.projector import null_space_projector
from kem.consolidation.alphaedit.solve import alphaedit_layer_update
from kem.consolidation.alphaedit.state import AlphaEditState
from kem.consolidation.context import EditContext
from kem.consolidation.delta import WeightDelta
from kem.consolidation.shared.prompts import model_fingerprint
from kem.consolidation.shared.spread import spread_update
from kem.edit import Edit

log = logging.getLogger(__name__)

STATE_KEY = "alphaedit"


def compute_alphaedit(
    model: Any, tok: Any, edits: Sequence[Edit], hparams: AlphaEditHParams, ctx: EditContext
) -> WeightDelta:
    """AlphaEdit's :class:`WeightDelta` for a batch of edits.

    Reads and updates ``ctx.state["alphaedit"]`` (an :class:`AlphaEditState`): the caller is expected
    to apply the returned delta before computing the next batch with the same context.
    """
    t0 = time.perf_counter()
    fp = model_fingerprint(model)
    layers = list(hparams.layers)
    state: AlphaEditState = ctx.state.setdefault(STATE_KEY, AlphaEditState())
    need = [layer for layer in layers if layer not in state.projectors]
    if need:
        covs = ctx.second_moments(model, tok, need, hparams.mom2_samples, hparams.mom2_max_tokens, ctx.cov_fingerprint or fp)
        for layer in need:
            state.projectors[layer] = null_space_projector(covs[layer], hparams.nullspace_threshold)
            log.info("AlphaEdit layer %d: null space of dimension %d", layer, round(float(state.projectors[layer].trace())))
    t_cov = time.perf_counter() - t0
    templates = ctx.templates.get(model, tok, hparams.context_templates, hparams.template_length, fingerprint=fp)

    def solver(layer: int, keys: Any, resid: Any) -> Any:
        return alphaedit_layer_update(state.projectors[layer], state.past.get(layer), keys, resid, hparams.l2)

    delta, keys, info = spread_update(model, tok, edits, layers, templates, hparams.values, solver, "alphaedit")
    for layer, k in keys.items():
        state.add_keys(layer, k)
    state.edits += len(edits)
    info["seconds"]["covariance"] = t_cov
    info["seconds"]["total"] = time.perf_counter() - t0
    delta.meta = {"edit_ids": [e.id for e in edits], "hparams": hparams.model_dump(mode="json"), **info}
    log.info("AlphaEdit: %d edits in %.1f s", len(edits), info["seconds"]["total"])
    return delta
