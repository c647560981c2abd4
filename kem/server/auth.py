"""API keys and tenancy for ``kem serve``: a key maps to a namespace (and optional limits).

The keys file (``--keys FILE`` or ``KEM_API_KEYS_FILE``) has one key per line, ``#`` comments allowed::

    # KEY                  NAMESPACE   [admin]  [review] [rpm=N] [tpm=N] [parallel=N]
    sk-alice-123           alice
    sha256:9f86d08...      bob                  # the key's SHA-256 hex digest, so it is not stored in clear
    sk-ops-root            *                    # namespace "*": an admin key
    sk-ops-2               ops        admin     # an admin key whose own namespace is "ops"
    sha256:60303ae...      carol      rpm=60 tpm=20000 parallel=2
    sha256:2c26b46...      interns    review               # its edits wait for an admin's approval

Store keys hashed (``sha256:`` + the hex digest of the key): ``POST /admin/keys`` writes only the digest
and returns the key once, and :meth:`KeyRing.hash_clear_keys` rewrites clear-text entries as digests.
``review``: the key's new edits arrive ``pending`` and apply once an admin approves them (docs/time.md).
``rpm`` / ``tpm`` / ``parallel`` limit the key's requests and tokens per minute and requests in flight
(:mod:`kem.server.limits`); without ``parallel=`` the server-wide ``KEM_MAX_PARALLEL_PER_KEY`` applies.
kem rewrites the file atomically (a temporary file in the same folder, fsync, rename), keeping its mode
(a new file is 0600).

A tenant key reads and writes only its own namespace's edits and only gets them applied. An admin
key sees every namespace (``?namespace=`` / the ``x-kem-namespace`` header / an edit's ``namespace``
field pick one; default: its own, or ``default`` for ``*``) and manages keys (``/admin/keys``).
Without a keys file auth is off and every caller is an admin of the ``default`` namespace.

Replicas that share a PostgreSQL edit store can share their keys too: ``KEM_API_KEYS_FILE=store``
(``kem serve --keys store``) keeps them, hashed, in the store's ``api_keys`` table
(:mod:`kem.stores.pg_keys`). One :class:`KeyRing` serves both, over a small :class:`KeyBackend`
(:class:`FileKeys` or :class:`~kem.stores.pg_keys.PostgresKeys`); ``kem keys add|list|revoke`` manages
either from the command line.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kem.edit import NAMESPACE_RE
from kem.errors import AuthError, ForbiddenError, ValidationError
from kem.files import write_atomic
from kem.keys import NO_LIMITS, KeyBackend, KeyEntry, KeyLimits, digest

if TYPE_CHECKING:
    from kem.settings import Settings

log = logging.getLogger(__name__)

ALL = "*"


@dataclass(frozen=True)
class Principal:
    """Who is calling: their namespace and whether they are an admin."""

    namespace: str
    admin: bool = False
    key_id: str = ""  # first 12 hex digits of the key's SHA-256 (safe to log)
    limits: KeyLimits = NO_LIMITS
    review: bool = False  # this key's new edits arrive pending (an admin approves them)

    def namespace_for(self, requested: str | None) -> str:
        """The namespace a request acts on. Tenants may only name their own (else 403)."""
        if not requested or requested == self.namespace:
            return self.namespace
        if self.admin:
            if not NAMESPACE_RE.fullmatch(requested):
                raise ValidationError(f"namespace {requested!r} is not a valid namespace", field="namespace")
            return requested
        raise ForbiddenError(f"this API key belongs to namespace {self.namespace!r}; it cannot act on {requested!r}")

    @property
    def actor(self) -> str:
        """Who this caller is in the audit log: ``admin:<key id>``, ``key:<key id>@<namespace>``, or
        ``anonymous`` with auth off."""
        if not self.key_id:
            return "anonymous"
        return f"admin:{self.key_id}" if self.admin else f"key:{self.key_id}@{self.namespace}"

    def list_scope(self, requested: str | None) -> str | None:
        """Namespace filter for listings: admins see all namespaces unless they pick one."""
        if self.admin and not requested:
            return None
        return self.namespace_for(requested)


LIMIT_NAMES = ("rpm", "tpm", "parallel")


def _entry_digest(key: str) -> str:
    """The digest a keys-file entry's first column stands for (``sha256:HEX`` or a clear-text key)."""
    return key[7:].lower() if key.lower().startswith("sha256:") else digest(key)


def parse_keys(text: str, where: str = "keys file") -> dict[str, KeyEntry]:
    """Parse a keys file's text into ``{sha256 hex: entry}``. Errors name the line."""
    out: dict[str, KeyEntry] = {}
    usage = "expected 'KEY NAMESPACE [admin] [review] [rpm=N] [tpm=N] [parallel=N]'"
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValidationError(f"{where} line {n}: {usage} (got {raw.strip()!r})", field="keys")
        key, ns = parts[0], parts[1]
        admin = ns == ALL
        review = False
        limits: dict[str, int] = {}
        for opt in parts[2:]:
            name, eq, value = opt.partition("=")
            if not eq and name.lower() == "admin":
                admin = True
            elif not eq and name.lower() == "review":
                review = True
            elif eq and name in LIMIT_NAMES and name not in limits and value.isascii() and value.isdigit() \
                    and int(value) >= 1:
                limits[name] = int(value)
            else:
                raise ValidationError(f"{where} line {n}: {usage}, each limit a whole number >= 1 at most once "
                                      f"(got {opt!r})", field="keys")
        if ns != ALL and not NAMESPACE_RE.fullmatch(ns):
            raise ValidationError(f"{where} line {n}: {ns!r} is not a valid namespace", field="keys")
        hashed = key.lower().startswith("sha256:")
        h = _entry_digest(key)
        if hashed and (len(h) != 64 or any(c not in "0123456789abcdef" for c in h)):
            raise ValidationError(f"{where} line {n}: sha256: must be followed by 64 hex digits", field="keys")
        out[h] = KeyEntry(h, "default" if ns == ALL else ns, admin, KeyLimits(**limits), hashed, review)
    return out


def _key_line(h: str, namespace: str, admin: bool, limits: KeyLimits, review: bool = False) -> str:
    opts = [" admin"] if admin and namespace != ALL else []
    opts += [" review"] if review else []
    opts += [f" {name}={getattr(limits, name)}" for name in LIMIT_NAMES if getattr(limits, name) is not None]
    return f"sha256:{h} {namespace}{''.join(opts)}"


class FileKeys:
    """The keys file (format in the module docstring), rewritten atomically, keeping hand edits."""

    refresh: float | None = None

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        if not self.path.is_file():
            raise ValidationError(f"keys file {self.path} does not exist", field="keys")

    def load(self) -> dict[str, KeyEntry]:
        keys = parse_keys(self.path.read_text(encoding="utf-8"), str(self.path))
        clear = sum(not e.hashed for e in keys.values())
        if clear:
            log.warning("%s holds %d API keys in clear text; store them as sha256:HEX digests "
                        "(KeyRing.hash_clear_keys rewrites them)", self.path, clear)
        if stat.S_IMODE(self.path.stat().st_mode) & 0o077:
            log.warning("%s is readable by other users (mode %o); chmod 600 it", self.path,
                        stat.S_IMODE(self.path.stat().st_mode))
        return keys

    def rewrite(self, edit: Callable[[builtins.list[str]], builtins.list[str]]) -> None:
        """Re-read the keys file (keeping edits made to it by hand), change its lines, write it atomically."""
        lines = self.path.read_text(encoding="utf-8").splitlines()
        write_atomic(self.path, "".join(line + "\n" for line in edit(lines)))

    def add(self, entry: KeyEntry) -> None:
        self.rewrite(lambda lines: [*lines, _key_line(entry.digest, entry.namespace, entry.admin, entry.limits)])

    def remove(self, prefix: str) -> set[str]:
        gone: set[str] = set()

        def edit(lines: builtins.list[str]) -> builtins.list[str]:
            keep = []
            for raw in lines:
                h = _line_digest(raw)
                if h is not None and h.startswith(prefix):
                    gone.add(h)
                else:
                    keep.append(raw)
            return keep

        self.rewrite(edit)
        return gone


class KeyRing:
    """The API keys, looked up by SHA-256 digest (so only digests are kept in memory).

    Args:
        path: The keys file; ``None`` (and no ``backend``): auth off.
        backend: Where the keys live instead of a file (:class:`KeyBackend`; the PostgreSQL store's
            ``api_keys`` table: :meth:`from_settings` with ``KEM_API_KEYS_FILE=store``).
    """

    def __init__(self, path: str | Path | None = None, *, backend: KeyBackend | None = None) -> None:
        self.path = Path(path) if path and backend is None else None
        self.backend: KeyBackend | None = backend or (FileKeys(self.path) if self.path is not None else None)
        self._lock = threading.Lock()
        self._keys: dict[str, KeyEntry] = {}
        self._loaded = self._forced = 0.0
        if self.backend is not None:
            self._keys = self.backend.load()
            self._loaded = time.monotonic()
            log.info("auth on: %d keys from %s", len(self._keys), self.backend.where)

    @classmethod
    def from_settings(cls, path: str | Path | None = None, settings: Settings | None = None) -> KeyRing:
        """``path``, else ``settings.api_keys_file`` (``KEM_API_KEYS_FILE``); neither: auth off. The value
        ``store`` keeps the keys in the PostgreSQL edit store (``settings.store``), shared by replicas."""
        path = path or (settings.api_keys_file if settings is not None else None) or None
        if path is not None and str(path) == STORE_KEYS:
            if settings is None:
                raise ValidationError("API keys in the store need the settings naming the store", field="keys")
            return cls(backend=store_keys(settings))
        return cls(path)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def _refresh(self, force: bool = False) -> None:
        """Re-read a shared backend's keys when they are older than its ``refresh`` (or ``force``, at most
        every 0.2 s: an unknown key may have just been added by another replica). A failed read keeps
        the keys read last."""
        b = self.backend
        if b is None or b.refresh is None:
            return
        now = time.monotonic()
        if now - self._loaded < b.refresh and not (force and now - self._forced > 0.2):
            return
        if force:
            self._forced = now
        try:
            keys = b.load()
        except Exception as exc:  # the database is away: keep serving with the keys read last
            log.warning("cannot re-read the API keys from %s (%s); using the %d read before", b.where, exc,
                        len(self._keys))
            self._loaded = time.monotonic()
            return
        with self._lock:
            self._keys, self._loaded = keys, time.monotonic()

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The caller for an ``Authorization: Bearer KEY`` header (or an ``x-api-key`` header)."""
        if not self.enabled:
            return Principal("default", admin=True)
        key = api_key
        if authorization:
            scheme, _, value = authorization.partition(" ")
            key = value.strip() if scheme.lower() == "bearer" else None
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer YOUR_KEY'")
        h = digest(key)
        self._refresh()
        entry = self._keys.get(h)
        if entry is None:
            self._refresh(force=True)
            entry = self._keys.get(h)
        if entry is None or not secrets.compare_digest(entry.digest, h):
            raise AuthError("invalid API key")
        return Principal(entry.namespace, entry.admin, h[:12], entry.limits, entry.review)

    # ---- key management (admin) -----------------------------------------------------------------------
    def list(self) -> builtins.list[dict[str, object]]:
        self._refresh(force=True)
        with self._lock:
            out: list[dict[str, object]] = []
            for e in self._keys.values():
                row: dict[str, object] = {"id": e.digest[:12], "namespace": e.namespace, "admin": e.admin}
                if e.review:
                    row["review"] = True
                row.update({n: getattr(e.limits, n) for n in LIMIT_NAMES if getattr(e.limits, n) is not None})
                out.append(row)
            return out

    def _rewrite(self, edit: Callable[[builtins.list[str]], builtins.list[str]]) -> None:
        assert isinstance(self.backend, FileKeys)
        self.backend.rewrite(edit)

    def create(self, namespace: str, admin: bool = False, *, limits: KeyLimits = NO_LIMITS,
               review: bool = False) -> str:
        """Make a new key for ``namespace``; only its digest is stored. Returns the key, which is not
        stored anywhere: the caller shows it once."""
        if self.backend is None:
            raise ValidationError("auth is off (no keys file): start kem serve with --keys FILE", field="keys")
        if namespace != ALL and not NAMESPACE_RE.fullmatch(namespace):
            raise ValidationError(f"namespace {namespace!r} is not a valid namespace", field="namespace")
        key = "kem-" + secrets.token_urlsafe(24)
        h = digest(key)
        entry = KeyEntry(h, "default" if namespace == ALL else namespace, admin or namespace == ALL, limits,
                         review=review)
        with self._lock:
            if isinstance(self.backend, FileKeys):  # the file keeps "*" as written
                self.backend.rewrite(lambda lines: [*lines, _key_line(h, namespace, admin, limits, review)])
            else:
                self.backend.add(entry)
            self._keys[h] = entry
        return key

    def revoke(self, key_id: str) -> int:
        """Remove every key whose digest starts with ``key_id`` (at least 8 hex digits) from memory and
        from where the keys live."""
        if len(key_id) < 8:
            raise ValidationError("key id must be at least 8 hex digits (GET /admin/keys lists them)", field="id")
        with self._lock:
            gone = set(self.backend.remove(key_id.lower())) if self.backend is not None else set()
            gone |= {h for h in self._keys if h.startswith(key_id.lower())}
            for h in gone:
                self._keys.pop(h, None)
        return len(gone)

    def hash_clear_keys(self) -> int:
        """Rewrite the keys file's clear-text keys as ``sha256:HEX`` digests (namespace, options and
        comments kept). Clients keep using the same keys. Returns how many lines changed."""
        if not isinstance(self.backend, FileKeys):
            return 0  # other backends hold digests only
        changed = 0

        def edit(lines: list[str]) -> list[str]:
            nonlocal changed
            out = []
            for raw in lines:
                body, hash_mark, comment = raw.partition("#")
                parts = body.split()
                if parts and not parts[0].lower().startswith("sha256:"):
                    lead = body[:len(body) - len(body.lstrip())]
                    rest = body.lstrip()[len(parts[0]):]
                    raw = f"{lead}sha256:{digest(parts[0])}{rest}{hash_mark}{comment}"
                    changed += 1
                out.append(raw)
            return out

        with self._lock:
            self._rewrite(edit)
            self._keys = {h: KeyEntry(e.digest, e.namespace, e.admin, e.limits, True, e.review)
                          for h, e in self._keys.items()}
        return changed


STORE_KEYS = "store"  # KEM_API_KEYS_FILE / --keys value: the keys live in the PostgreSQL edit store


def store_keys(settings: Settings) -> KeyBackend:
    """The key table of the edit store ``settings.store`` names (its services' ``key_backend``)."""
    from kem.stores import services_for

    backend = services_for(settings.store).key_backend()
    if backend is None:
        raise ValidationError("API keys in the store (--keys store / KEM_API_KEYS_FILE=store) need a PostgreSQL "
                              "edit store (--store postgresql://... or KEM_STORE); with SQLite use a keys file",
                              field="keys")
    return backend


def _line_digest(raw: str) -> str | None:
    """The digest a keys-file line names, or ``None`` for a blank or comment line."""
    line = raw.split("#", 1)[0].strip()
    return _entry_digest(line.split()[0]) if line else None
