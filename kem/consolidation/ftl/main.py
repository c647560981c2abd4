"""FT-L end to end: train a dense update of one layer (step 1, :mod:`.train`) and wrap it as a delta."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kem.consolidation.context import EditContext
from kem.consolidation.delta import WeightDelta
from kem.consolidation.ftl.hparams import FtlHParams
from kem.consolidation.ftl.train import train_layer
from kem.consolidation.shared.linalg import add_layer_update
from kem.edit import Edit

log = logging.getLogger(__name__)


def compute_ftl(model: Any, tok: Any, edits: Sequence[Edit], hparams: FtlHParams, ctx: EditContext) -> WeightDelta:
    """FT-L's dense :class:`WeightDelta` for ``edits`` (trained together)."""
    t0 = time.perf_counter()
    templates = ctx.templates.get(model, tok, hparams.context_templates, hparams.template_length)
    dw, steps, probs = train_layer(model, tok, edits, templates, hparams)
    delta = WeightDelta(method="ft-l")
    add_layer_update(delta, model, hparams.layer, dw, None)
    delta.meta = {
        "edit_ids": [e.id for e in edits],
        "hparams": hparams.model_dump(mode="json"),
        "steps": steps,
        "target_probs": probs,
        "seconds": {"total": time.perf_counter() - t0},
    }
    log.info("FT-L: %d edits in %.1f s (%d steps)", len(edits), time.perf_counter() - t0, steps)
    return delta
