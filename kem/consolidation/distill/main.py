"""distill end to end: forms and teacher labels (:mod:`.data`), retain set, training (:mod:`.train`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kem.consolidation.context import EditContext
from kem.consolidation.delta import WeightDelta
from kem.consolidation.distill import data as D
from kem.consolidation.distill.hparams import DistillHParams
from kem.consolidation.distill.train import default_layers, subject_keys, train
from kem.consolidation.forms import chat_text
from kem.consolidation.shared.prompts import model_fingerprint
from kem.edit import Edit

log = logging.getLogger(__name__)


def compute_distill(model: Any, tok: Any, edits: Sequence[Edit], hparams: DistillHParams, ctx: EditContext) -> WeightDelta:
    """distill's low-rank :class:`WeightDelta` for ``edits`` (trained together; the model is unchanged)."""
    hp = hparams
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    prefixes = ctx.templates.get(model, tok, hp.prefixes, hp.prefix_length) if hp.prefixes else ["{}"]
    forms = D.edit_forms(edits, prefixes)
    follower = ctx.follower if hp.teacher else None
    labels, missed = D.teacher_labels(model, tok, edits, forms, follower, hp.chat_tokens, progress=ctx.progress)
    secs["teacher"] = time.perf_counter() - t0
    eot = D.end_of_turn(tok)
    edit_items: list[D.Item] = []
    for i, (fs, ls) in enumerate(zip(forms, labels, strict=True)):
        for f, ans in zip(fs, ls, strict=True):
            if f.chat:
                p, a = D.encode(tok, chat_text(tok, f.text), ans + eot)
            else:
                p, a = D.encode(tok, f.text, ans)
            edit_items.append(D.Item("edit", p, a, i, f.kind))

    t1 = time.perf_counter()
    comp, chats = D.retain_prompts(edits, D.retain_pool(), same_relation=hp.retain_same_relation,
                                   random_n=hp.retain_random, same_subject=hp.retain_same_subject,
                                   chat=hp.retain_chat, seed=hp.seed)
    comp_ans, chat_ans = D.parent_labels(model, tok, comp, chats, hp.retain_tokens, hp.chat_tokens, ctx.progress)
    retain_items = [D.Item("retain", *D.encode(tok, p, a), form="retain") for p, a in zip(comp, comp_ans, strict=True) if a]
    retain_items += [D.Item("retain", *D.encode(tok, chat_text(tok, q), a), form="retain-chat")
                     for q, a in zip(chats, chat_ans, strict=True) if a]
    secs["retain"] = time.perf_counter() - t1

    fixed_a = None
    if hp.anchor == "subject":
        t3 = time.perf_counter()
        layers = list(hp.layers if hp.layers is not None else default_layers(model))
        covs = ctx.second_moments(model, tok, layers, hp.mom2_samples, hp.mom2_max_tokens,
                                  ctx.cov_fingerprint or model_fingerprint(model))
        secs["covariance"] = time.perf_counter() - t3
        fixed_a = subject_keys(model, tok, edits, layers, prefixes, covs, hp.key_ridge)
    start = None
    if hp.start != "none":
        from kem.consolidation.method_registry import get_method

        t4 = time.perf_counter()
        spec = get_method(hp.start)
        shared = {k: getattr(hp, k) for k in ("mom2_samples", "mom2_max_tokens") if k in spec.hparams_cls.model_fields}
        start = spec.compute(model, tok, edits, spec.hparams_for(model, **shared), ctx)
        secs[hp.start] = time.perf_counter() - t4
    t2 = time.perf_counter()
    delta, stats = train(model, tok, edit_items, retain_items, hp, progress=ctx.progress, fixed_a=fixed_a, start=start)
    secs["train"] = time.perf_counter() - t2
    secs["total"] = time.perf_counter() - t0
    delta.meta = {
        "edit_ids": [e.id for e in edits],
        "hparams": hp.model_dump(mode="json"),
        "forms": len(edit_items),
        "teacher": str(follower) if follower else None,
        "teacher_missed": missed,
        "retain": len(retain_items),
        "train": stats,
        "seconds": secs,
    }
    log.info("distill: %d edits, %d forms (teacher missed %d), %d retain, %d steps in %.1f s", len(edits),
             len(edit_items), missed, len(retain_items), stats["steps"], secs["total"])
    return delta
