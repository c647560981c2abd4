"""The weight-editing methods as ``kem eval`` methods (``--method rome|memit|alphaedit|ft-l``).

Each ``prepare(edits)`` computes the method's delta on the shared (unedited) model, applies it, and
``close()`` reverts it exactly. In ``sequential`` mode each group's delta is computed on the model
already carrying the earlier groups (AlphaEdit keeps its cache of past keys across them). Options
come from ``EvalContext.options[name]`` (or ``options["consolidation"]``): ``corpus`` (covariance
corpus; default ``$KEM_EVAL_COV_CORPUS``, else texts sampled from the model) and ``hparams``
(overrides, e.g. ``{"mom2_samples": 500}``); the environment variable ``KEM_EVAL_COV_SAMPLES`` overrides ``mom2_samples`` too. Imported by
:mod:`kem.eval.run`, which registers them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from kem.edit import Edit
from kem.eval.methods import EvalContext, WeightMethod, register_eval_method

METHODS = ("rome", "memit", "alphaedit", "ft-l")


def _apply_fn(name: str, ctx: EvalContext) -> Callable[..., Callable[[], None]]:
    from kem.consolidation.context import EditContext
    from kem.consolidation.delta import apply_delta
    from kem.consolidation.registry import get_method

    spec = get_method(name)
    opts = {**ctx.options.get("consolidation", {}), **ctx.options.get(name, {})}
    overrides = dict(opts.get("hparams", {}))
    if os.environ.get("KEM_EVAL_COV_SAMPLES") and "mom2_samples" in spec.hparams_cls.model_fields:
        overrides.setdefault("mom2_samples", int(os.environ["KEM_EVAL_COV_SAMPLES"]))
    corpus = opts.get("corpus") or os.environ.get("KEM_EVAL_COV_CORPUS") or None
    cache_dir = getattr(ctx.settings, "cache_dir", None)
    ectx = EditContext.from_cache_dir(cache_dir, corpus=corpus)
    box: dict[str, Any] = {}

    def apply(model: Any, tok: Any, edits: Sequence[Edit], fresh: bool = True) -> Callable[[], None]:
        if "hp" not in box:  # first call: the model is the unedited one
            ectx.pin_covariance(model)
            box["hp"] = spec.hparams_for(model, **overrides)
        if fresh:  # the previous prepare was reverted: no past edits in the weights
            ectx.forget_edits()
        delta = spec.compute(model, tok, list(edits), box["hp"], ectx)
        return apply_delta(model, delta).revert

    return apply


def _factory(name: str) -> Callable[[EvalContext], WeightMethod]:
    def build(ctx: EvalContext) -> WeightMethod:
        return WeightMethod(name, ctx, _apply_fn(name, ctx))

    return build


def register_all() -> None:
    """Register every method not registered yet (idempotent)."""
    from kem.eval.methods import eval_methods

    have = set(eval_methods())
    for name in METHODS:
        if name not in have:
            register_eval_method(name, _factory(name))


register_all()
