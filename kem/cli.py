"""kem's command line: ``kem edit ...``, ``kem ask``, ``kem demo`` (+ eval, consolidate, serve when
their extras are installed). Every command that prints results takes ``--json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from kem.cli_support import run_app
from kem.errors import KemError
from kem.runtime import own_process

app = typer.Typer(no_args_is_help=True, add_completion=False, help="kem: knowledge-editing middleware for LLMs.")
edit_app = typer.Typer(no_args_is_help=True, help="Add, list, show, remove and import edits.")
app.add_typer(edit_app, name="edit")

HomeOpt = Annotated[Path | None, typer.Option("--home", help="Data folder (default: $KEM_HOME or ./kem-data).")]
NsOpt = Annotated[str | None, typer.Option("--namespace", "-n", help="Namespace (default: $KEM_NAMESPACE or 'default').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
AsOfOpt = Annotated[str | None, typer.Option(
    "--as-of", help="A time (ISO 8601, e.g. 2025-01-01 or 2025-06-01T12:00:00Z): the edits that applied then.")]
ConflictOpt = Annotated[str, typer.Option(
    "--on-conflict", help="A live edit of the same subject and relation (however phrased): 'supersede' it "
    "(default), 'reject' the new one, or 'keep' both (multi-valued relations).")]
StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="Edit store: 'sqlite' (<home>/edits.sqlite, the default), sqlite:///PATH or "
    "postgresql://user:pass@host:port/db[?schema=NAME] (default: $KEM_STORE).")]


def _settings(home: Path | None, store: str | None = None) -> Any:
    from kem.settings import settings_for

    return settings_for(home, store)


def _editor(home: Path | None, store: str | None = None) -> Any:
    from kem.editor import KnowledgeEditor

    s = _settings(home, store)
    return KnowledgeEditor.open(s.home, settings=s)


def _ns(namespace: str | None, home: Path | None = None) -> str:
    return namespace or _settings(home).namespace


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=1, default=str))


def _edit_row(e: Any) -> dict[str, Any]:
    return e.model_dump(mode="json")


# ---- kem edit ---------------------------------------------------------------------------------------
@edit_app.command("add")
def edit_add(
    subject: Annotated[str, typer.Option(help="The entity, e.g. 'Danielle Darrieux'.")],
    prompt: Annotated[str, typer.Option(help="Prompt with {} for the subject (or the subject verbatim).")],
    target: Annotated[str, typer.Option(help="The new completion, e.g. 'English'.")],
    target_true: Annotated[str | None, typer.Option(help="The old completion, if known.")] = None,
    relation: Annotated[str | None, typer.Option(help="Relation id (e.g. P103): the surest way to supersede.")] = None,
    paraphrase: Annotated[list[str] | None, typer.Option("--paraphrase", help="Another phrasing (repeatable).")] = None,
    source: Annotated[str | None, typer.Option(help="Provenance.")] = None,
    evidence: Annotated[str | None, typer.Option(help="Why it is true: a URL or a quote.")] = None,
    valid_from: Annotated[str | None, typer.Option("--valid-from", help="Applies from this time (ISO 8601).")] = None,
    valid_until: Annotated[str | None, typer.Option("--valid-until", help="Applies until this time (ISO 8601).")] = None,
    on_conflict: ConflictOpt = "supersede",
    review: Annotated[bool, typer.Option("--review", help="Store it pending: it applies once approved.")] = False,
    namespace: NsOpt = None,
    home: HomeOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add one edit. A live edit of the same subject and relation is superseded (see --on-conflict)."""
    from kem.edit import Edit, parse_time

    edit = Edit.parse({"subject": subject, "prompt": prompt, "target_new": target, "target_true": target_true,
                       "relation": relation, "paraphrases": paraphrase or [], "source": source or "cli",
                       "evidence": evidence, "valid_from": parse_time(valid_from, "--valid-from"),
                       "valid_until": parse_time(valid_until, "--valid-until"), "namespace": _ns(namespace, home)})
    with _editor(home, store) as ke:
        stored = ke.add(edit, on_conflict=on_conflict, review=review)
    if as_json:
        _print_json(_edit_row(stored))
    else:
        extra = f" (supersedes {', '.join(stored.supersedes)})" if stored.supersedes else ""
        state = f" {stored.status.value}" if stored.status.value != "active" else ""
        typer.echo(f"added{state} {stored.id} [{stored.namespace}]: {stored.fact}{extra}")


@edit_app.command("approve")
def edit_approve(edit_id: str, namespace: NsOpt = None, on_conflict: ConflictOpt = "supersede",
                 home: HomeOpt = None, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a pending edit: it applies from now on, superseding like a new edit."""
    with _editor(home, store) as ke:
        e = ke.approve(edit_id, namespace, on_conflict=on_conflict)
    _print_json(_edit_row(e)) if as_json else typer.echo(
        f"approved {e.id}: {e.fact}" + (f" (supersedes {', '.join(e.supersedes)})" if e.supersedes else ""))


@edit_app.command("reject")
def edit_reject(edit_id: str, namespace: NsOpt = None, home: HomeOpt = None, store: StoreOpt = None,
                as_json: JsonOpt = False) -> None:
    """Reject a pending edit: it never applies (its history is kept)."""
    db = _store(home, store)
    try:
        e = db.review(edit_id, False, namespace)
    finally:
        db.close()
    _print_json(_edit_row(e)) if as_json else typer.echo(f"rejected {e.id}")


@edit_app.command("list")
def edit_list(
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Only this namespace (default: all).")] = None,
    status: Annotated[str | None, typer.Option(help="active, consolidated, superseded, pending, rejected or "
                                               "retired (default: all).")] = None,
    as_of: AsOfOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many.")] = 0,
    home: HomeOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List edits (newest last); --as-of: those that applied at a time."""
    from kem.edit import EditStatus, parse_time
    from kem.errors import ValidationError
    from kem.stores.rules import HELD

    try:
        st = EditStatus(status) if status else None
    except ValueError:
        raise ValidationError(f"--status must be one of {', '.join(s.value for s in EditStatus)} (got {status!r})",
                              field="status") from None
    when = parse_time(as_of, "--as-of")
    db = _store(home, store)  # no embedder
    try:
        if when is None:
            rows = db.list(namespace, st, limit, offset)
        else:
            rows = [e for e in db.list(namespace, st or HELD) if e.applies_at(when)][offset:offset + limit]
    finally:
        db.close()
    if as_json:
        _print_json([_edit_row(e) for e in rows])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "namespace", "status", "fact", "valid")
    for e in rows:
        window = f"{e.valid_from:%Y-%m-%d %H:%M} .." if e.valid_from else ".."
        window += f" {e.ends_at:%Y-%m-%d %H:%M}" if e.ends_at else ""
        table.add_row(e.id, e.namespace, e.status.value, e.fact, window if window != ".." else "")
    Console().print(table)


@app.command("audit")
def audit(
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Only this namespace (default: all).")] = None,
    since: Annotated[int, typer.Option(help="Rows after this seq.")] = 0,
    limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
    home: HomeOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit log: every change to edits (add, supersede, update, delete, consolidate, approve, reject)
    with who and when. --json prints JSON lines (one row each), for export."""
    db = _store(home, store)
    try:
        rows = db.audit(namespace, since, limit)
    finally:
        db.close()
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r.as_dict(), ensure_ascii=False, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("seq", "at", "actor", "op", "namespace", "edit", "fact")
    for r in rows:
        snap = r.snapshot or {}
        fact = f"{str(snap.get('prompt', '')).replace('{}', str(snap.get('subject', '')))} {snap.get('target_new', '')}"
        table.add_row(str(r.seq), r.at[:19], r.actor or "", r.op, r.namespace, r.edit_id, fact)
    Console().print(table)


def _store(home: Path | None, store: str | None = None) -> Any:
    from kem.stores import open_store

    return open_store(_settings(home, store))


@edit_app.command("show")
def edit_show(edit_id: str, namespace: NsOpt = None, home: HomeOpt = None, store: StoreOpt = None,
              as_json: JsonOpt = False) -> None:
    """Show one edit and its history."""
    db = _store(home, store)
    try:
        e = db.get(edit_id, namespace)
        hist = db.history(edit_id, namespace)
    finally:
        db.close()
    row = {**_edit_row(e), "history": [{"seq": h.seq, "op": h.op, "at": h.at, "actor": h.actor} for h in hist]}
    if as_json:
        _print_json(row)
    else:
        for k, v in row.items():
            typer.echo(f"{k:>16}: {v}")


@edit_app.command("rm")
def edit_rm(edit_id: str, namespace: NsOpt = None, home: HomeOpt = None, store: StoreOpt = None,
            as_json: JsonOpt = False) -> None:
    """Delete an edit (its history is kept)."""
    db = _store(home, store)
    try:
        e = db.delete(edit_id, namespace)
    finally:
        db.close()
    _print_json({"deleted": e.id}) if as_json else typer.echo(f"deleted {e.id}")


@edit_app.command("import")
def edit_import(
    file: Annotated[Path, typer.Argument(help="JSONL (or a JSON list) of kem edits, or CounterFact / ZsRE / MQuAKE "
                                         "JSON (as in ../shared/data).")],
    namespace: NsOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Import at most this many (valid) records.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse the whole file if a record is invalid "
                                         "(default: skip invalid records and say which).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=0, help="Edits per transaction, embedded while "
                                            "the previous batch is written; 0: one transaction for the file.")] = 1000,
    on_conflict: ConflictOpt = "supersede",
    home: HomeOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import edits from a file, one transaction per --batch-size edits (the next batch is embedded while
    one is written). If a batch fails, the batches before it stay imported and the rest is not written
    (--batch-size 0: one transaction, every valid record or nothing). Invalid records are skipped and
    reported before anything is written (record index, field, reason); --strict refuses the file instead."""
    from kem.datasets import read_edits

    loaded = read_edits(file, namespace=_ns(namespace, home), limit=limit)
    if strict:
        loaded.check()
    if loaded.errors:
        typer.secho(loaded.summary(), fg="yellow", err=True)
    with _editor(home, store) as ke:
        stored = ke.add_many(loaded.items, progress=not as_json, batch_size=batch_size or None,
                             on_conflict=on_conflict)
    superseded = sorted({i for e in stored for i in e.supersedes})
    if as_json:
        _print_json({"imported": len(stored), "ids": [e.id for e in stored], "superseded": superseded,
                     "skipped": [e.as_dict() for e in loaded.errors]})
    else:
        skipped = f" (skipped {len(loaded.errors)} invalid records)" if loaded.errors else ""
        sup = f"; {len(superseded)} earlier edits superseded" if superseded else ""
        typer.echo(f"imported {len(stored)} edits from {file}{skipped}{sup}")


# ---- kem ask ----------------------------------------------------------------------------------------
@app.command("ask")
def ask(
    text: Annotated[str, typer.Argument(help="A question (chat) or, with --complete, a prompt to continue.")],
    namespace: NsOpt = None,
    complete: Annotated[bool, typer.Option("--complete", help="Plain completion instead of chat.")] = False,
    no_edits: Annotated[bool, typer.Option("--no-edits", help="Bypass the fast path (weights alone).")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length.")] = None,
    model_version: Annotated[str | None, typer.Option("--model-version", help="Ask a published version (vN).")] = None,
    as_of: AsOfOpt = None,
    home: HomeOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the model with the edits of a namespace applied in context (--as-of: those that applied then)."""
    from kem.edit import parse_time

    when = parse_time(as_of, "--as-of")
    ke = _editor(home, store)
    try:
        if model_version is not None:
            _use_version(ke, model_version)
        ns = _ns(namespace, home)
        ans = (ke.generate(text, ns, max_new_tokens=max_new_tokens, use_edits=not no_edits, as_of=when) if complete
               else ke.chat(text, ns, max_new_tokens=max_new_tokens, use_edits=not no_edits, as_of=when))
    finally:
        ke.close()
    if as_json:
        _print_json(ans.as_dict())
    else:
        typer.echo(ans.text.strip())
        for s in ans.edits:
            typer.secho(f"  [edit {s.edit.id} score={s.score:.3f}] {s.edit.fact}", fg="cyan", err=True)


def _use_version(ke: Any, version: str) -> None:
    """Point the editor at a published model version (needs the consolidation module)."""
    try:
        from kem.consolidation.version_weights import use_version
    except ImportError as exc:
        raise KemError(f"--model-version needs kem.consolidation ({exc})") from None
    use_version(ke, version)


# ---- kem demo ---------------------------------------------------------------------------------------
@app.command("demo")
def demo(
    as_json: JsonOpt = False,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length.")] = 12,
    keep: Annotated[Path | None, typer.Option("--keep", help="Keep the demo's edit store in this folder (default: a "
                                              "temporary one); then e.g. kem consolidate --home DIR --method distill.")] = None,
) -> None:
    """Add a few CounterFact edits to a temporary store and show answers before and after."""
    from kem.demo import run_demo

    rows = run_demo(max_new_tokens=max_new_tokens, progress=not as_json, home=keep)
    if as_json:
        _print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "question", "unedited", "with kem", "edit applied", show_lines=True)
    for r in rows:
        table.add_row(r["kind"], r["question"], r["unedited"], r["edited"],
                      ", ".join(f"{e['subject']}→{e['target_new']} ({e['score']:.2f})" for e in r["edits"]) or "-")
    Console(width=160).print(table)


#: Earlier names still accepted (hidden from ``kem --help``): ``kem adapter`` is ``kem follower`` (the
#: edit-follower LoRA; "adapter" names kem's engines package).
ALIASES = {"adapter": "follower"}

#: Commands that need optional parts: (name, module, attribute, is a sub-app, modules it needs at run
#: time, what to install). Their modules import those lazily, so the check is explicit.
OPTIONAL_COMMANDS = (
    ("eval", "kem.eval.eval_cli", "eval_command", False, ("torch", "transformers"), "scripts/install.sh"),
    ("consolidate", "kem.consolidation.consolidate_cli", "consolidate", False, ("torch", "transformers"), "scripts/install.sh"),
    ("models", "kem.consolidation.consolidate_cli", "models_app", True, (), ""),
    ("follower", "kem.follower.follower_cli", "follower_app", True, ("torch", "transformers", "peft"), "scripts/install.sh"),
    ("serve", "kem.server.serve_cli", "serve", False, ("fastapi", "uvicorn", "jinja2", "multipart"),
     "pip install 'kem[server]'"),
    ("keys", "kem.server.keys_cli", "keys_app", True, (), ""),
)


def _missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing them)."""
    import importlib.util

    out = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(m)
    return out


def _mount_optional() -> None:
    """Mount the commands that need optional parts (eval, consolidation, serving). One whose parts are
    missing is still listed by ``kem --help``, marked unavailable with the reason; running it says what
    to install and exits 2."""
    import importlib

    for name, module, attr, sub_app, needs, install in OPTIONAL_COMMANDS:
        missing = _missing(needs)
        try:
            target = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            missing = missing or [str(exc.name or exc)]
        if missing:
            why = f"needs {', '.join(missing)}" + (f" ({install})" if install else "")
            _mount_unavailable(name, why)
            for old in (a for a, new in ALIASES.items() if new == name):
                _mount_unavailable(old, why, hidden=True)
        elif sub_app:
            app.add_typer(target, name=name)
            for old in (a for a, new in ALIASES.items() if new == name):
                app.add_typer(target, name=old, hidden=True)
        else:
            app.command(name)(target)


def _mount_unavailable(name: str, why: str, hidden: bool = False) -> None:
    def unavailable() -> None:
        raise KemError(f"kem {name} is unavailable: {why}")

    unavailable.__doc__ = "(unavailable: " + why.replace("[", "\\[") + ")"  # \[: not rich markup
    app.command(name, hidden=hidden, context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                       "help_option_names": []})(unavailable)


def main() -> NoReturn:
    from kem.provenance import cli_actor, set_actor

    own_process()  # before torch loads (kem/runtime.py)
    set_actor(cli_actor())  # the audit log records this process's changes as cli:<user>
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _mount_optional()
    run_app(app)
