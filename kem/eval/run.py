"""``run_eval``: the Python entry point of ``kem eval`` (load data and models, evaluate, write)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kem.datasets import EvalCase, Loaded, read_cases
from kem.eval.eval_methods import EvalContext
from kem.eval.harness import EvalConfig, Evaluator
from kem.settings import Settings

log = logging.getLogger(__name__)


def load_context(settings: Settings | None = None, generator: Any = None, embedder: Any = None) -> EvalContext:
    """Load the generator and embedder of ``settings`` (unless given; default: the environment's) into one
    shared context."""
    settings = settings or Settings()
    if generator is None:
        from kem.adapters.transformers import TransformersGenerator

        generator = TransformersGenerator.load(settings.model, settings.cache_dir, device=settings.resolved_device())
    if embedder is None:
        from kem.embedding import make_embedder

        embedder = make_embedder(settings)  # the served backend (KEM_EMBEDDER_BACKEND)
    return EvalContext(generator=generator, embedder=embedder, settings=settings)


def register_optional_methods(settings: Settings) -> None:
    """Import the modules that plug methods in (``settings.method_plugins``, ``KEM_METHOD_PLUGINS``; default
    ``kem.consolidation.builtin_methods``: the weight-editing methods, each with its eval factory). The eval
    layer names them as data, never imports them in code; a build without kem's own keeps none/ike/adapter,
    and a plug-in you named that cannot load is a warning."""
    import importlib

    default = Settings.model_fields["method_plugins"].default
    for name in (n.strip() for n in settings.method_plugins.split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:  # a build without that package, or without its dependencies
            (log.debug if name in default.split(",") else log.warning)("eval methods of %s unavailable: %s",
                                                                       name, exc)


def run_eval(
    method: str | Sequence[str],
    dataset: str | os.PathLike[str],
    n: int | None = 200,
    seed: int | None = None,
    mode: str = "single",
    out: str | os.PathLike[str] | None = None,
    *,
    ctx: EvalContext | None = None,
    generator: Any = None,
    embedder: Any = None,
    settings: Settings | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    cases: Sequence[EvalCase] | Loaded[EvalCase] | None = None,
    strict: bool = False,
    config: EvalConfig | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate one or more methods on a dataset; optionally write results under ``out``.

    Args:
        method: A registered method name (``none``, ``ike``, ...), a comma-separated list, or a list.
            Several methods in one call share the model and the unedited model's memoised answers.
        dataset: ``counterfact``, ``zsre``, ``mquake`` or the path of a file in one of those formats.
        n: Number of cases (None: all).
        seed: None: the first ``n`` records; an int: a seeded random sample.
        mode: ``single`` or ``batch``.
        out: Folder for ``results.json``, ``results.md`` and the PNG plots (nothing written when None).
        ctx: Shared generator/embedder (else loaded from ``generator``/``embedder``/``settings``).
        cases: Pre-loaded cases (skip loading ``dataset``), or what :func:`kem.datasets.read_cases` read
            (its skipped records are reported like those of a loaded dataset).
        strict: Refuse a dataset with an invalid record (:class:`~kem.errors.DatasetFormatError` naming
            the record and field) instead of skipping it with a warning.
        config: Generation budgets etc. (its ``mode`` is replaced by ``mode``).
        evaluator: Reuse an evaluator (and its memoised results) across calls.
        progress: Show a tqdm bar.
        options: Merged into the context's per-method options (e.g. ``{"consolidation": {"hparams":
            {"layer": 18}}}``); recorded in ``results.json``.

    Returns:
        The results dict written to ``results.json``: ``config``, ``summary`` (method ->
        ``{"generation.reliability": ..., ...}``), ``scope_scores``, ``cases`` (method -> records),
        ``skipped`` (the invalid records left out: index, field, message), ``wall_s``.
    """
    from dataclasses import replace

    t0, c0 = time.perf_counter(), time.process_time()
    settings = settings or (ctx.settings if ctx is not None else None) or Settings()  # the environment's
    register_optional_methods(settings)
    methods = [m.strip() for m in (method.split(",") if isinstance(method, str) else method) if m.strip()]
    loaded_here = cases is None
    if cases is None:
        cases = read_cases(dataset, n=n, seed=seed, data_dir=data_dir, settings=settings)
    skipped: list[dict[str, Any]] = []
    if isinstance(cases, Loaded):
        if strict:
            cases.check()
        if cases.errors:  # a caller that read the file itself has reported them already
            log.log(logging.WARNING if loaded_here else logging.INFO, "%s", cases.summary())
        skipped = [e.as_dict() for e in cases.errors]
        cases = cases.items
    if evaluator is None:
        ctx = ctx or load_context(settings, generator, embedder)
        evaluator = Evaluator(ctx, replace(config or EvalConfig(), mode=mode))
    else:
        evaluator.config = replace(config or evaluator.config, mode=mode)
    for key, value in (options or {}).items():
        evaluator.ctx.options[key] = {**evaluator.ctx.options.get(key, {}), **value}
    runs = evaluator.run(methods, cases, progress=progress)
    gen = evaluator.ctx.generator
    results: dict[str, Any] = {
        "config": {
            "methods": methods, "dataset": str(dataset), "n": len(cases), "seed": seed, "mode": mode,
            "model": getattr(gen, "name", "?"),
            "embedder": getattr(evaluator.ctx.embedder, "name", None),
            **{k: v for k, v in vars(evaluator.config).items() if k != "mode"},
            "options": _jsonable(options or {}),
        },
        "summary": {r.method: r.summary for r in runs},
        "scope_scores": {r.method: {"in": r.scope_in, "out": r.scope_out} for r in runs},
        "cases": {r.method: r.cases for r in runs},
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,  # all threads; wall_s on a busy machine overstates the work
        "reference_s": runs[0].reference_seconds if runs else 0.0,
        "edit_s": {r.method: r.edit_seconds for r in runs},
        "scorer": dict(evaluator.scorer.stats),
    }
    if out is not None:
        from kem.eval.report import write_results

        write_results(results, Path(out))
    return results


def _jsonable(value: Any) -> Any:
    """``value`` with anything json cannot write replaced by its ``repr``."""
    import json

    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return repr(value)
