"""Edit stores (``kem.stores``): :class:`SQLiteStore` (the embedded, durable default) and
:class:`InMemoryStore` (the reference, for tests and ephemeral use). :mod:`kem.stores.rules` holds the
rules both apply."""

from kem.stores.memory import InMemoryStore
from kem.stores.sqlite import SQLiteStore

__all__ = ["InMemoryStore", "SQLiteStore"]
