"""``kem consolidate`` and ``kem models list | show | rollback`` (mounted by :mod:`kem.cli`).

Exit codes: 0 published (or nothing to do, or a dry run), 1 the gates refused (nothing published),
2 an error (``error: ...``, raised as :class:`~kem.errors.KemError` and printed by ``kem.cli.main``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

models_app = typer.Typer(no_args_is_help=True, help="Published model versions: list, show, roll back.")

HomeOpt = Annotated[Path | None, typer.Option("--home", help="Data folder (default: $KEM_HOME or ./kem-data).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
NamespaceOpt = Annotated[str | None, typer.Option("--namespace", "-n", help="A tenant's adapter versions "
                                                  "(models/tenants/NAME) instead of the shared ones.")]
StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="Edit store: 'sqlite' (<home>/edits.sqlite, the default), sqlite:///PATH or "
    "postgresql://user:pass@host:port/db[?schema=NAME] (default: $KEM_STORE).")]


def _settings(home: Path | None, store: str | None = None) -> Any:
    from kem.settings import settings_for

    return settings_for(home, store)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=1, default=str))


def consolidate(
    method: Annotated[str | None, typer.Option("--method", "-m", help="A registered method: memit (default), distill, alphaedit, rome or ft-l.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Only this namespace (default: every shared namespace, KEM_SHARED_NAMESPACES). A tenant namespace publishes that tenant's LoRA adapter version (models/tenants/NAME/vN), never shared weights.")] = None,
    max_edits: Annotated[int | None, typer.Option(help="At most this many pending edits (oldest first).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and evaluate; publish and change nothing.")] = False,
    parent: Annotated[str, typer.Option("--from", help="Build on: 'current' (default), 'base' or a version vN.")] = "current",
    min_reliability: Annotated[float, typer.Option(help="Gate: fraction of edits whose greedy answer carries the target.")] = 0.8,
    min_locality: Annotated[float, typer.Option(help="Gate: fraction of held-out probes answered as by the parent.")] = 0.85,
    min_generalization: Annotated[float, typer.Option(help="Gate: fraction of the edits' paraphrases and chat questions "
                                                      "answered with the target (an edit is retired only when it "
                                                      "passes every form in any case).")] = 0.0,
    max_perplexity_increase: Annotated[float, typer.Option(help="Gate: largest relative perplexity rise on held-out "
                                                           "WikiText-2 against the parent (0.05 = +5%; negative: "
                                                           "not measured).")] = 0.05,
    corpus: Annotated[Path | None, typer.Option(help="Covariance corpus: .txt, folder or .jsonl (default: the WikiText-2 text kem ships; \"model\" samples texts from the model).")] = None,
    cov_samples: Annotated[int | None, typer.Option(help="Covariance texts (method default: 1000).")] = None,
    batch_size: Annotated[int, typer.Option(help="Edits per compute call; each chunk is computed on the model "
                                            "with the earlier ones applied.")] = 64,
    partial: Annotated[bool, typer.Option("--partial/--all-or-nothing", help="Stay within the gates chunk by "
                                          "chunk: a chunk that would break the locality or perplexity gate is "
                                          "taken back, and it and the later edits wait for a later job "
                                          "(--all-or-nothing: publish all or nothing).")] = True,
    max_rank: Annotated[int, typer.Option(help="Tenant adapters: per-module LoRA rank limit (the engine's max LoRA "
                                          "rank); larger updates are SVD-truncated and the gates check the result.")] = 64,
    hparams: Annotated[list[str] | None, typer.Option("--hparams", "-H", help="KEY=VALUE hyperparameter override "
                                                      "(repeatable; dots reach nested ones, e.g. -H values.edit_batch=4).")] = None,
    home: HomeOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the pending edits into the weights, check them, and publish a new model version. One job at a
    time per store: a second one says who holds the lock and exits with code 2, touching nothing."""
    from kem.consolidation.job import Gates
    from kem.consolidation.job import consolidate as run_job
    from kem.consolidation.method_registry import get_method, parse_hparams

    spec = get_method(method)  # the job's one lookup: the spec is passed along
    try:
        overrides = parse_hparams(hparams or [])
        spec.hparams_for(None, **overrides)  # a wrong name or value fails here, before any work
    except ValueError as exc:  # pydantic's ValidationError names the field
        raise typer.BadParameter(str(exc), param_hint="--hparams") from None
    if cov_samples is not None:
        if "mom2_samples" not in spec.hparams_cls.model_fields:
            raise typer.BadParameter(f"{spec.name} uses no covariance statistics", param_hint="--cov-samples")
        overrides["mom2_samples"] = cov_samples
    result = run_job(_settings(home, store), method=spec, namespace=namespace, max_edits=max_edits, dry_run=dry_run,
                     gates=Gates(min_reliability, min_locality, min_generalization=min_generalization,
                                 max_perplexity_increase=None if max_perplexity_increase < 0 else max_perplexity_increase), parent=parent, corpus=corpus, hparams=overrides,
                     batch_size=batch_size, partial=partial, progress=not as_json, max_rank=max_rank)
    if as_json:
        _print_json(result.as_dict())
    else:
        typer.echo(result.message)
        for p in result.metrics.get("changed_probes", [])[:5]:
            typer.echo(f"  changed probe: {p['prompt']!r}: {p['parent']!r} -> {p['edited']!r}")
        for e in result.metrics.get("failed_edits", [])[:5]:
            for f in e["missed"][:3]:
                typer.echo(f"  kept {e['id']} ({e['target_new']!r}), {f['kind']} missed: {f['text']!r} -> {f['answer'].strip()[:80]!r}")
    if result.gate_failed:
        raise typer.Exit(1)


def _versions(home: Path | None, store: str | None, namespace: str | None) -> Any:
    """The versions of the settings' models folder (``KEM_MODELS_DIR``) and, with a PostgreSQL store, its database."""
    from kem.versions import versions_for

    return versions_for(_settings(home, store), namespace)


@models_app.command("list")
def models_list(namespace: NamespaceOpt = None, home: HomeOpt = None, store: StoreOpt = None,
                as_json: JsonOpt = False) -> None:
    """List published versions (the current one is marked): the shared ones, or a tenant's adapters. With a
    PostgreSQL store, the versions and the current one recorded in its database."""
    with _versions(home, store, namespace) as vs:
        _list(vs, namespace, as_json)


def _list(vs: Any, namespace: str | None, as_json: bool) -> None:
    cur = vs.current()
    rows: list[dict[str, Any]] = []
    for m in vs.list():
        row = {"version": m.version, "current": m.version == cur, "kind": m.kind, "parent": m.parent,
               "method": m.method, "edits": len(m.edit_ids), "reliability": m.metrics.get("reliability"),
               "locality": m.metrics.get("locality"), "created_at": m.created_at.isoformat()}
        if namespace is not None:
            adapter = getattr(m, "adapter", None) or {}
            row.update(tenant_parent=m.tenant_parent, adapter_bytes=adapter.get("bytes"),
                       max_rel_error=adapter.get("max_rel_error"))
        rows.append(row)
    tenants = vs.tenants() if namespace is None else []
    if as_json:
        _print_json({"namespace": namespace, "current": cur, "versions": rows,
                     **({"tenants": tenants} if namespace is None else {})})
        return
    if not rows:
        typer.echo(f"no published versions under {vs.root} (serving the "
                   f"{'base model' if namespace is None else 'shared model without an adapter'})")
    else:
        from rich.console import Console
        from rich.table import Table

        title = None if namespace is None else f"adapters of namespace {namespace} (parent: the shared version each applies to)"
        table = Table("", "version", "parent", "method", "edits", "reliability", "locality", "created", title=title)
        for r in rows:
            table.add_row("*" if r["current"] else "", r["version"], r["parent"] or "base", r["method"], str(r["edits"]),
                          f"{r['reliability']:.3f}" if r["reliability"] is not None else "-",
                          f"{r['locality']:.3f}" if r["locality"] is not None else "-", r["created_at"][:19])
        Console().print(table)
    if tenants:
        shown = ", ".join(tenants[:8]) + (f" and {len(tenants) - 8} more" if len(tenants) > 8 else "")
        typer.echo(f"{len(tenants)} tenant(s) have their own adapter versions ({shown}): kem models list --namespace NAME")


@models_app.command("show")
def models_show(version: Annotated[str, typer.Argument(help="vN")], namespace: NamespaceOpt = None,
                home: HomeOpt = None, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Show a version's manifest."""
    with _versions(home, store, namespace) as vs:
        man = vs.manifest(version)
        folder = vs.root / man.version
        row = {**man.model_dump(mode="json"), "current": vs.current() == man.version,
               "path": str(folder) if folder.is_dir() else f"{folder} (missing here)",
               "absorbed_versions": [vs.label(v) for v in vs.ancestors(version)]}
    if as_json:
        _print_json(row)
    else:
        for k, v in row.items():
            if k == "edit_ids":
                v = f"{len(v)} edits: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
            typer.echo(f"{k:>18}: {v}")


@models_app.command("rollback")
def models_rollback(version: Annotated[str, typer.Argument(help="vN, or 'base' for the base model (a tenant: no adapter)")],
                    namespace: NamespaceOpt = None, home: HomeOpt = None, store: StoreOpt = None,
                    as_json: JsonOpt = False) -> None:
    """Serve an earlier version (nothing is deleted); edits of later versions return to the fast path. With a
    PostgreSQL store the database's current moves too, and kem serve replicas serving current hot-swap."""
    with _versions(home, store, namespace) as vs:
        before = vs.current()
        vs.rollback(version)
        after = vs.current()
        absorbed = [vs.label(v) for v in vs.ancestors(after)]
    if as_json:
        _print_json({"namespace": namespace, "previous": before, "current": after, "absorbed_versions": absorbed})
    else:
        whose = "" if namespace is None else f" of namespace {namespace}"
        typer.echo(f"current model version{whose}: {after or 'base'} (was {before or 'base'})")
