"""A consolidation method as a ``kem eval`` method: the default ``eval_factory`` of :func:`register_method`.

Each ``prepare(edits)`` computes the method's delta on the shared (unedited) model, applies it, and
``close()`` reverts it exactly. In ``sequential`` mode each group's delta is computed on the model
already carrying the earlier groups (a method's running state, e.g. AlphaEdit's past keys, is kept
across them). Options come from ``EvalContext.options[name]`` (or ``options["consolidation"]``):
``corpus`` (covariance corpus; default ``Settings.eval_cov_corpus``, i.e. ``KEM_EVAL_COV_CORPUS``,
else the text kem ships; "model" samples from the model) and ``hparams`` (overrides, e.g. ``{"mom2_samples": 500}``);
``Settings.eval_cov_samples`` (``KEM_EVAL_COV_SAMPLES``) sets ``mom2_samples`` unless ``hparams`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kem.edit import Edit
from kem.eval.eval_methods import EvalContext, WeightMethod

if TYPE_CHECKING:
    from kem.consolidation.method_registry import MethodSpec


def apply_fn(spec: MethodSpec | str, ctx: EvalContext) -> Callable[..., Callable[[], None]]:
    """``apply(model, tok, edits, fresh=True) -> revert`` for :class:`~kem.eval.eval_methods.WeightMethod`:
    computes ``spec``'s delta with one :class:`EditContext` kept across calls and applies it."""
    from kem.consolidation.context import EditContext, served_follower
    from kem.consolidation.delta import apply_delta
    from kem.consolidation.method_registry import get_method
    if isinstance(spec, str):
        spec = get_method(spec)
    method = spec
    opts = {**ctx.options.get("consolidation", {}), **ctx.options.get(method.name, {})}
    overrides = dict(opts.get("hparams", {}))
    settings = ctx.settings
    samples = settings.eval_cov_samples
    if samples and "mom2_samples" in method.hparams_cls.model_fields:
        overrides.setdefault("mom2_samples", samples)
    corpus = opts.get("corpus") or settings.eval_cov_corpus or None
    ectx = EditContext.from_cache_dir(settings.cache_dir, corpus=corpus)
    ectx.follower = served_follower(settings)
    box: dict[str, Any] = {}

    def apply(model: Any, tok: Any, edits: Sequence[Edit], fresh: bool = True) -> Callable[[], None]:
        if "hp" not in box:  # first call: the model is the unedited one
            ectx.pin_covariance(model)
            box["hp"] = method.hparams_for(model, **overrides)
        if fresh:  # the previous prepare was reverted: no past edits in the weights
            ectx.forget_edits()
        delta = method.compute(model, tok, list(edits), box["hp"], ectx)
        return apply_delta(model, delta).revert

    return apply




def weight_method_factory(spec: MethodSpec) -> Callable[[EvalContext], WeightMethod]:
    """``factory(ctx) -> WeightMethod`` that computes, applies and reverts ``spec``'s deltas."""

    def build(ctx: EvalContext) -> WeightMethod:
        return WeightMethod(spec.name, ctx, apply_fn(spec, ctx))

    return build
