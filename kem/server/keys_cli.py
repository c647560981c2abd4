"""``kem keys add | list | revoke``: manage kem serve's API keys from the command line (mounted by
:mod:`kem.cli`). The keys live in the keys file (``--keys FILE`` / ``KEM_API_KEYS_FILE``) or, with a
PostgreSQL edit store (``--store`` / ``KEM_STORE``) and no file named, in the store's ``api_keys``
table that every replica reads. Keys are stored hashed; ``add`` prints the new key once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kem.errors import NotFoundError, ValidationError

keys_app = typer.Typer(no_args_is_help=True, help="API keys of kem serve: add, list, revoke (file or PostgreSQL).")

KeysOpt = Annotated[Path | None, typer.Option(
    "--keys", help="The keys file (default: $KEM_API_KEYS_FILE; with a PostgreSQL store and no file: the store's "
    "api_keys table; 'store' names that table explicitly).")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="Edit store URL (default: $KEM_STORE).")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="Data folder (default: $KEM_HOME or ./kem-data).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def ring_for(keys: Path | None, store: str | None, home: Path | None, create: bool = False) -> Any:
    """The :class:`~kem.server.auth.KeyRing` the options name (see the module docstring)."""
    from kem.server.auth import STORE_KEYS, KeyRing, store_keys
    from kem.settings import Settings
    from kem.stores import services_for

    s = Settings()
    s = s.model_copy(update={k: v for k, v in (("home", home), ("store", store)) if v is not None})
    path = keys or s.api_keys_file
    if path is not None and str(path) != STORE_KEYS:
        if create and not Path(path).exists():
            fd = Path(path)
            fd.parent.mkdir(parents=True, exist_ok=True)
            fd.touch(mode=0o600)
        return KeyRing(path)
    if path is not None:  # 'store': the store's key table, or a clear error
        return KeyRing(backend=store_keys(s))
    backend = services_for(s.store).key_backend()  # None: a local store keeps no keys
    if backend is not None:
        return KeyRing(backend=backend)
    raise ValidationError("name where the keys live: --keys FILE (or KEM_API_KEYS_FILE), or a PostgreSQL store "
                          "(--store postgresql://... or KEM_STORE)", field="keys")


@keys_app.command("add")
def keys_add(
    namespace: Annotated[str, typer.Argument(help="The key's namespace, or '*' for an admin of every namespace.")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (manages keys, sees every namespace).")] = False,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    parallel: Annotated[int | None, typer.Option(min=1, help="Requests in flight.")] = None,
    review: Annotated[bool, typer.Option("--review", help="Its new edits arrive pending until an admin "
                                         "approves them (kem edit approve).")] = False,
    keys: KeysOpt = None, store: StoreOpt = None, home: HomeOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a key; it is printed once (only its SHA-256 digest is stored)."""
    from kem.keys import KeyLimits
    from kem.server.auth import digest

    ring = ring_for(keys, store, home, create=True)
    key = ring.create(namespace, admin, limits=KeyLimits(rpm=rpm, tpm=tpm, parallel=parallel), review=review)
    row = {"key": key, "id": digest(key)[:12], "namespace": namespace, "admin": admin or namespace == "*",
           "review": review, "where": ring.backend.where}
    if as_json:
        typer.echo(json.dumps(row))
    else:
        typer.echo(f"{key}\n(id {row['id']}, namespace {namespace}{', admin' if row['admin'] else ''}; "
                   f"stored hashed in {row['where']}: this is the only time the key is shown)")


@keys_app.command("list")
def keys_list(keys: KeysOpt = None, store: StoreOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List the keys (ids: the first 12 hex digits of their digests)."""
    rows = ring_for(keys, store, home).list()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        extra = " ".join(f"{k}={r[k]}" for k in ("rpm", "tpm", "parallel") if k in r)
        typer.echo(f"{r['id']}  {r['namespace']}{'  admin' if r['admin'] else ''}{'  ' + extra if extra else ''}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="A key id (at least 8 hex digits, from kem keys list).")],
    keys: KeysOpt = None, store: StoreOpt = None, home: HomeOpt = None, as_json: JsonOpt = False,
) -> None:
    """Revoke every key whose id starts with KEY_ID."""
    n = ring_for(keys, store, home).revoke(key_id)
    if n == 0:
        raise NotFoundError(f"no API key with id {key_id!r}")
    typer.echo(json.dumps({"revoked": n}) if as_json else f"revoked {n} key{'s' if n > 1 else ''}")
