"""Edit stores (``kem.stores``): :class:`SQLiteStore` (the embedded, durable default),
:class:`~kem.stores.postgres.PostgresStore` (shared by several replicas; ``KEM_STORE=postgresql://...``)
and :class:`InMemoryStore` (the reference, for tests and ephemeral use). :mod:`kem.stores.rules` holds
the rules they all apply. :func:`open_store` is the one place a command builds its store; what a kind of
store offers besides edits (keys, versions, a job lock, notifications) is its :mod:`~kem.stores.services`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kem.errors import ValidationError
from kem.settings import Settings
from kem.stores.in_memory import InMemoryStore
from kem.stores.services import StoreServices, is_postgres, services_for
from kem.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from kem.protocols import EditStore

__all__ = ["InMemoryStore", "SQLiteStore", "StoreServices", "index_dir", "is_postgres", "open_store",
           "services_for", "split_schema"]


def split_schema(url: str) -> tuple[str, str]:
    """``(libpq URL, kem schema)``: kem's own ``?schema=NAME`` query parameter taken out of ``url``
    (libpq would refuse it); default schema ``kem``."""
    from kem.stores.postgres import DEFAULT_SCHEMA, check_schema_name

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), DEFAULT_SCHEMA)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), check_schema_name(schema)


def open_store(settings: Settings | None = None, home: str | Path | None = None, *, url: str | None = None) -> EditStore:
    """The edit store kem's commands and servers use, chosen by URL.

    Args:
        settings: kem settings (``store``, ``home``, ``sqlite_synchronous``, ``store_timeout``); default
            ``Settings()``.
        home: The data folder (default ``settings.home``): the SQLite file lives there.
        url: Overrides ``settings.store`` (``KEM_STORE`` / ``--store``): empty or ``sqlite``:
            ``<home>/edits.sqlite`` (the embedded default); ``sqlite:///PATH``: that SQLite file;
            ``postgresql://user:pass@host:port/db[?schema=NAME]``: :class:`~kem.stores.postgres.PostgresStore`.
    """
    if settings is None:  # a caller with only a URL and a folder (tests, tools): the environment's
        settings = Settings()
    url = url if url is not None else settings.store
    home = Path(home) if home is not None else Path(settings.home)
    sync = settings.sqlite_synchronous
    if not url or url == "sqlite":
        return SQLiteStore(home / "edits.sqlite", synchronous=sync)
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url[len("sqlite://"):]), synchronous=sync)
    if is_postgres(url):
        from kem.stores.postgres import PostgresStore

        conninfo, schema = split_schema(url)
        timeout = settings.store_timeout
        return PostgresStore(conninfo, schema, **({"timeout": timeout} if timeout else {}))
    raise ValidationError(f"store must be 'sqlite', sqlite:///PATH or postgresql://... (got {url.split('://')[0]!r}://...)"
                          if "://" in url else f"store must be 'sqlite', sqlite:///PATH or postgresql://... (got {url!r})",
                          field="store")


def index_dir(store: EditStore, home: str | Path) -> Path:
    """Where a store's derived FAISS index lives under ``home`` (always local to this machine):
    ``<home>/index`` for the SQLite file, ``<home>/index-pg-<hash>`` per PostgreSQL database and schema,
    so switching ``--store`` never replays one store's history onto another's index."""
    return store.services.index_dir(home)
