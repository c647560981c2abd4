"""Who is making a change: the actor recorded on every edit (``created_by``) and every history row.

The server sets it per request from the API key's principal (``key:<name>``), the CLI once per
process (``cli:<user>``). Library code that sets nothing is ``local:<user>``. A context variable, so
concurrent requests (threads or tasks) each keep their own.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ACTOR: ContextVar[str | None] = ContextVar("kem_actor", default=None)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "unknown"


def current_actor() -> str:
    """The actor of the change being made now."""
    return _ACTOR.get() or f"local:{_user()}"


def set_actor(actor: str | None) -> None:
    """Set the actor for the rest of this context (the CLI calls it once)."""
    _ACTOR.set(actor)


@contextmanager
def acting_as(actor: str | None) -> Iterator[None]:
    """Changes made inside the block are recorded as ``actor``."""
    token = _ACTOR.set(actor)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def cli_actor() -> str:
    return f"cli:{_user()}"
