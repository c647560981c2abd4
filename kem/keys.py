"""API key records, shared by the server's key ring (:mod:`kem.server.auth`) and the stores that keep keys
(:mod:`kem.stores.pg_keys`): a key's limits, its entry, and the :class:`KeyBackend` protocol. Only SHA-256
digests of keys are ever stored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from kem.errors import ValidationError


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; ``None``: no limit of that kind (``parallel=None``: the server-wide default)."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    parallel: int | None = None  # requests in flight at once

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "parallel"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValidationError(f"{name} must be a whole number >= 1 (got {value!r})", field=name)


NO_LIMITS = KeyLimits()


def digest(key: str) -> str:
    """The SHA-256 hex digest kem stores for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    digest: str
    namespace: str
    admin: bool
    limits: KeyLimits = NO_LIMITS
    hashed: bool = True  # False: the file holds this key in clear text
    review: bool = False  # new edits through this key arrive pending


class KeyBackend(Protocol):
    """Where a :class:`~kem.server.auth.KeyRing`'s keys live: the keys file (:class:`kem.server.auth.FileKeys`)
    or, for replicas that share them, the PostgreSQL store (:class:`kem.stores.pg_keys.PostgresKeys`, offered
    by the store's services: :meth:`kem.stores.services.StoreServices.key_backend`). Only digests are stored.

    ``refresh``: seconds after which the ring re-reads the keys (another process may change them);
    ``None``: only this process changes them (re-read at start).
    """

    where: str
    refresh: float | None

    def load(self) -> dict[str, KeyEntry]: ...

    def add(self, entry: KeyEntry) -> None: ...

    def remove(self, prefix: str) -> set[str]: ...
