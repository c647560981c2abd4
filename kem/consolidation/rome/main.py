"""ROME end to end: for each edit, key (step 1), value (step 2), rank-one update (step 3).

Several edits are applied one after another: each is computed on the model plus the earlier
edits' updates (through forward hooks; the model's weights are never touched).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kem.consolidation.context import EditContext
from kem.consolidation.delta import WeightDelta, delta_hooks
from kem.consolidation.rome.compute_key import compute_keys
from kem.consolidation.rome.compute_value import compute_value_delta
from kem.consolidation.rome.hparams import RomeHParams
from kem.consolidation.rome.rank_one import rank_one_update
from kem.consolidation.shared.linalg import add_layer_update
from kem.consolidation.shared.prompts import model_fingerprint
from kem.edit import Edit

log = logging.getLogger(__name__)


def compute_rome(model: Any, tok: Any, edits: Sequence[Edit], hparams: RomeHParams, ctx: EditContext) -> WeightDelta:
    """ROME's :class:`WeightDelta` for ``edits`` (rank one per edit, all on ``hparams.layer``)."""
    t0 = time.perf_counter()
    fp = model_fingerprint(model)
    cov = ctx.second_moments(model, tok, [hparams.layer], hparams.mom2_samples, hparams.mom2_max_tokens, ctx.cov_fingerprint or fp)[
        hparams.layer
    ]
    t_cov = time.perf_counter() - t0
    templates = ctx.templates.get(model, tok, hparams.context_templates, hparams.template_length, fingerprint=fp)
    delta = WeightDelta(method="rome")
    probs = []
    for edit in edits:
        with delta_hooks(model, delta if delta.updates else None):
            key = compute_keys(model, tok, [edit], hparams.layer, templates)[0]
            res = compute_value_delta(model, tok, [edit], hparams.layer, templates, hparams.values)
        a, b = rank_one_update(cov, key, res.delta[0], hparams.ridge)
        add_layer_update(delta, model, hparams.layer, a, b)
        probs.append(float(res.probs[0]))
    delta.meta = {
        "edit_ids": [e.id for e in edits],
        "hparams": hparams.model_dump(),
        "target_probs": probs,
        "seconds": {"covariance": t_cov, "total": time.perf_counter() - t0},
    }
    log.info("ROME: %d edits in %.1f s", len(edits), time.perf_counter() - t0)
    return delta
