"""What a kind of edit store offers besides edits: its **services**. Callers ask a store (``store.services``)
or a store URL (:func:`services_for`) what it can do, never the URL's scheme.

| service | local stores (a SQLite file, in memory) | PostgreSQL (shared by replicas) |
|---|---|---|
| ``notifications``: writes announced, replicas' indexes follow (:class:`kem.sync.Syncer`) | no | yes |
| ``job_lock``: one consolidation job at a time | a file lock in the models folder | an advisory lock |
| ``key_backend``: API keys every replica knows | none (a keys file) | the ``api_keys`` table |
| ``version_registry``: model versions every replica agrees on | none (folders only) | version tables |
| ``follows_versions`` / ``version_listener``: servers follow the recorded versions | no | yes |
| ``index_dir``: where the derived FAISS index lives | ``<home>/index`` | ``<home>/index-pg-<hash>`` |

A store offers shared rate limits by its own ``shared_limits()`` (None: per replica). Adding a store kind
means a :class:`StoreServices` subclass here and a branch in :func:`services_for` (the one place that reads a
URL's scheme, with :func:`kem.stores.open_store`); nothing else in kem changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from kem.joblock import JOB, HeldLock, file_lock

if TYPE_CHECKING:
    from kem.keys import KeyBackend
    from kem.settings import Settings
    from kem.stores.pg_listen import Listener
    from kem.versions import VersionRegistry

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreServices:
    """The services of a local store (a SQLite file, the in-memory store): nothing is shared with other
    machines, so every caller's local default applies (a keys file, a file lock, versions as folders)."""

    kind = "local"
    schema = ""  # the namespace of kem's tables in a shared database (PostgreSQL's schema)
    notifications = False  # writes are announced (LISTEN/NOTIFY): a replica's index follows them
    follows_versions = False  # model versions are recorded in the store: servers follow ``current``

    def job_lock(self, models_root: str | Path, job: str = JOB) -> AbstractContextManager[HeldLock]:
        """The lock one ``job`` at a time holds (raises ConflictError naming the holder when taken)."""
        return file_lock(models_root, job)

    def key_backend(self) -> KeyBackend | None:
        """The API keys every replica knows (None: keys live in a keys file)."""
        return None

    def version_registry(self) -> VersionRegistry | None:
        """Where model versions are recorded besides their folders (None: folders only). The caller closes it."""
        return None

    def listener(self, on_notify: Callable[[str, str], None], on_connect: Callable[[], None],
                 name: str) -> Listener:
        """A thread listening for announced writes (only where ``notifications``)."""
        raise TypeError(f"a {self.kind} store does not announce its writes")

    def version_listener(self, on_change: Callable[[str, str | None], None], on_connect: Callable[[], None],
                         name: str) -> Listener:
        """A thread told ``(namespace, version)`` when a version is published or rolled back anywhere
        (namespace '' for the shared versions; only where ``follows_versions``). Call ``start()``."""
        raise TypeError(f"a {self.kind} store does not record model versions")

    def index_dir(self, home: str | Path) -> Path:
        """Where this store's derived FAISS index lives under ``home`` (always local to this machine)."""
        return Path(home) / "index"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PostgresServices(StoreServices):
    """The services of a PostgreSQL store's schema: every replica on it shares keys, versions, the job lock
    and notifications.

    Args:
        conninfo: The libpq URL (without kem's ``?schema=``).
        schema: kem's schema in that database.
    """

    kind = "postgres"
    notifications = True
    follows_versions = True

    def __init__(self, conninfo: str, schema: str) -> None:
        self.conninfo = conninfo
        self.schema = schema

    @property
    def url(self) -> str:
        """The store URL with kem's ``?schema=`` (what :func:`kem.stores.open_store` and the pg_* modules read)."""
        sep = "&" if "?" in self.conninfo else "?"
        return f"{self.conninfo}{sep}schema={self.schema}"

    def job_lock(self, models_root: str | Path, job: str = JOB) -> AbstractContextManager[HeldLock]:
        from kem.stores.pg_lock import postgres_lock

        return postgres_lock(self.url, job)

    def key_backend(self) -> KeyBackend | None:
        from kem.stores.pg_keys import PostgresKeys

        return PostgresKeys(self.url)

    def version_registry(self) -> VersionRegistry | None:
        from kem.stores.pg_versions import PostgresVersions

        return PostgresVersions(self.url)

    def index_dir(self, home: str | Path) -> Path:
        """``<home>/index-pg-<hash>`` per database and schema, so switching ``--store`` never replays one
        store's history onto another's index."""
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(self.conninfo)
        ident = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}/{self.schema}"
        return Path(home) / f"index-pg-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"

    def listener(self, on_notify: Callable[[str, str], None], on_connect: Callable[[], None],
                 name: str) -> Listener:
        """A reconnecting ``LISTEN`` on the store's change channel (:mod:`kem.stores.pg_listen`)."""
        from kem.stores.pg_listen import Listener
        from kem.stores.postgres import NOTIFY_CHANNEL

        return Listener(self.conninfo, [NOTIFY_CHANNEL], on_notify, on_connect, name=name)

    def version_listener(self, on_change: Callable[[str, str | None], None], on_connect: Callable[[], None],
                         name: str) -> Listener:
        from kem.stores.pg_listen import Listener
        from kem.stores.pg_versions import CHANNEL, parse_payload

        def on_notify(channel: str, payload: str) -> None:
            parsed = parse_payload(payload)
            if parsed is not None and parsed[0] == self.schema:  # else another kem deployment in the database
                on_change(parsed[1], parsed[2])

        return Listener(self.conninfo, [CHANNEL], on_notify, on_connect, name=name)

    def __repr__(self) -> str:
        from kem.stores.postgres import redact

        return f"PostgresServices({redact(self.conninfo)!r}, schema={self.schema!r})"


class LocalStore:
    """A store on this machine only (the SQLite file, the in-memory store): it shares nothing with other
    machines, neither services nor rate limits."""

    services: StoreServices = StoreServices()

    def shared_limits(self, lease: float = 330.0, window: float = 60.0) -> None:
        """Rate limits shared by replicas: none (each process keeps its own, :class:`~kem.server.limits.Limiter`)."""
        return None


def is_postgres(url: str | None) -> bool:
    """Whether a store URL names PostgreSQL (``postgresql://`` or ``postgres://``)."""
    return bool(url) and str(url).startswith(POSTGRES_SCHEMES)


def services_for(url: str | None) -> StoreServices:
    """The services of the store ``url`` names (``KEM_STORE`` / ``--store``), without opening it."""
    if is_postgres(url):
        from kem.stores import split_schema

        return PostgresServices(*split_schema(str(url)))
    return StoreServices()


def job_lock(settings: Settings, job: str = JOB) -> AbstractContextManager[HeldLock]:
    """The lock for ``job`` on the store ``settings`` names: PostgreSQL's advisory lock, or a file lock in the
    models folder (``KEM_MODELS_DIR``, default ``<home>/models``). Raises ConflictError (naming the holder)
    at once when another process holds it."""
    return services_for(settings.store).job_lock(settings.models_root(), job)

