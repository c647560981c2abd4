"""MEMIT end to end: target values at the last layer (step 1, shared), keys per layer (step 2, shared
loop in :mod:`kem.consolidation.shared.spread`), batch least squares per layer (step 3, :mod:`.solve`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kem.consolidation.context import EditContext
from kem.consolidation.delta import WeightDelta
from kem.consolidation.memit.hparams import MemitHParams
from kem.consolidation.memit.solve import memit_layer_update
from kem.consolidation.shared.prompts import model_fingerprint
from kem.consolidation.shared.spread import spread_update
from kem.edit import Edit

log = logging.getLogger(__name__)


def compute_memit(model: Any, tok: Any, edits: Sequence[Edit], hparams: MemitHParams, ctx: EditContext) -> WeightDelta:
    """MEMIT's :class:`WeightDelta` for a batch of edits (rank ``len(edits)`` per edited layer)."""
    t0 = time.perf_counter()
    fp = model_fingerprint(model)
    layers = list(hparams.layers)
    covs = ctx.second_moments(model, tok, layers, hparams.mom2_samples, hparams.mom2_max_tokens, ctx.cov_fingerprint or fp)
    t_cov = time.perf_counter() - t0
    templates = ctx.templates.get(model, tok, hparams.context_templates, hparams.template_length, fingerprint=fp)

    def solver(layer: int, keys: Any, resid: Any) -> Any:
        return memit_layer_update(covs[layer], keys, resid, hparams.mom2_update_weight, hparams.ridge)

    delta, _, info = spread_update(model, tok, edits, layers, templates, hparams.values, solver, "memit")
    info["seconds"]["covariance"] = t_cov
    info["seconds"]["total"] = time.perf_counter() - t0
    delta.meta = {"edit_ids": [e.id for e in edits], "hparams": hparams.model_dump(mode="json"), **info}
    log.info("MEMIT: %d edits in %.1f s", len(edits), info["seconds"]["total"])
    return delta
