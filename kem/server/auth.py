"""API keys and tenancy for ``kem serve``: a key maps to a namespace.

The keys file (``--keys FILE`` or ``KEM_API_KEYS_FILE``) has one key per line, ``#`` comments allowed::

    # KEY                  NAMESPACE   [admin]
    sk-alice-123           alice
    sha256:9f86d08...      bob                  # the key's SHA-256 hex digest, so it is not stored in clear
    sk-ops-root            *                    # namespace "*": an admin key
    sk-ops-2               ops        admin     # an admin key whose own namespace is "ops"

A tenant key reads and writes only its own namespace's edits and only gets them applied. An admin
key sees every namespace (``?namespace=`` / the ``x-kem-namespace`` header / an edit's ``namespace``
field pick one; default: its own, or ``default`` for ``*``) and manages keys (``/admin/keys``).
Without a keys file auth is off and every caller is an admin of the ``default`` namespace.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from kem.edit import NAMESPACE_RE
from kem.errors import AuthError, ForbiddenError, ValidationError

log = logging.getLogger(__name__)

ALL = "*"


@dataclass(frozen=True)
class Principal:
    """Who is calling: their namespace and whether they are an admin."""

    namespace: str
    admin: bool = False
    key_id: str = ""  # first 12 hex digits of the key's SHA-256 (safe to log)

    def namespace_for(self, requested: str | None) -> str:
        """The namespace a request acts on. Tenants may only name their own (else 403)."""
        if not requested or requested == self.namespace:
            return self.namespace
        if self.admin:
            if not NAMESPACE_RE.fullmatch(requested):
                raise ValidationError(f"namespace {requested!r} is not a valid namespace", field="namespace")
            return requested
        raise ForbiddenError(f"this API key belongs to namespace {self.namespace!r}; it cannot act on {requested!r}")

    def list_scope(self, requested: str | None) -> str | None:
        """Namespace filter for listings: admins see all namespaces unless they pick one."""
        if self.admin and not requested:
            return None
        return self.namespace_for(requested)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    digest: str
    namespace: str
    admin: bool


def parse_keys(text: str, where: str = "keys file") -> dict[str, KeyEntry]:
    """Parse a keys file's text into ``{sha256 hex: entry}``. Errors name the line."""
    out: dict[str, KeyEntry] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() != "admin"):
            raise ValidationError(f"{where} line {n}: expected 'KEY NAMESPACE [admin]' (got {raw.strip()!r})",
                                  field="keys")
        key, ns = parts[0], parts[1]
        admin = ns == ALL or len(parts) == 3
        if ns != ALL and not NAMESPACE_RE.fullmatch(ns):
            raise ValidationError(f"{where} line {n}: {ns!r} is not a valid namespace", field="keys")
        if key.lower().startswith("sha256:"):
            h = key[7:].lower()
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValidationError(f"{where} line {n}: sha256: must be followed by 64 hex digits", field="keys")
        else:
            h = digest(key)
        out[h] = KeyEntry(h, "default" if ns == ALL else ns, admin)
    return out


class KeyRing:
    """The API keys, looked up by SHA-256 digest (so only digests are kept in memory).

    Args:
        path: The keys file; ``None``: auth off.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._keys: dict[str, KeyEntry] = {}
        if self.path is not None:
            if not self.path.is_file():
                raise ValidationError(f"keys file {self.path} does not exist", field="keys")
            self._keys = parse_keys(self.path.read_text(encoding="utf-8"), str(self.path))
            log.info("auth on: %d keys from %s", len(self._keys), self.path)

    @classmethod
    def from_env(cls, path: str | Path | None = None) -> KeyRing:
        return cls(path or os.environ.get("KEM_API_KEYS_FILE") or None)

    @property
    def enabled(self) -> bool:
        return self.path is not None

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
        entry = self._keys.get(h)
        if entry is None or not secrets.compare_digest(entry.digest, h):
            raise AuthError("invalid API key")
        return Principal(entry.namespace, entry.admin, h[:12])

    # ---- key management (admin) -----------------------------------------------------------------------
    def list(self) -> list[dict[str, object]]:
        with self._lock:
            return [{"id": e.digest[:12], "namespace": e.namespace, "admin": e.admin} for e in self._keys.values()]

    def create(self, namespace: str, admin: bool = False) -> str:
        """Make a new key for ``namespace``; its digest is appended to the keys file. Returns the key."""
        if not self.enabled:
            raise ValidationError("auth is off (no keys file): start kem serve with --keys FILE", field="keys")
        if namespace != ALL and not NAMESPACE_RE.fullmatch(namespace):
            raise ValidationError(f"namespace {namespace!r} is not a valid namespace", field="namespace")
        key = "kem-" + secrets.token_urlsafe(24)
        h = digest(key)
        with self._lock:
            assert self.path is not None
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f"sha256:{h} {namespace}{' admin' if admin and namespace != ALL else ''}\n")
            self._keys[h] = KeyEntry(h, "default" if namespace == ALL else namespace, admin or namespace == ALL)
        return key

    def revoke(self, key_id: str) -> int:
        """Remove every key whose digest starts with ``key_id`` (at least 8 hex digits) from memory and file."""
        if len(key_id) < 8:
            raise ValidationError("key id must be at least 8 hex digits (GET /admin/keys lists them)", field="id")
        with self._lock:
            gone = [h for h in self._keys if h.startswith(key_id.lower())]
            for h in gone:
                del self._keys[h]
            if gone and self.path is not None:
                kept = []
                for raw in self.path.read_text(encoding="utf-8").splitlines():
                    line = raw.split("#", 1)[0].strip()
                    if line:
                        k = line.split()[0]
                        h = k[7:].lower() if k.lower().startswith("sha256:") else digest(k)
                        if h in gone:
                            continue
                    kept.append(raw)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
                os.replace(tmp, self.path)
        return len(gone)
