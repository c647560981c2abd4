"""Persistent edit stores (``kem.stores``). The embedded default is :class:`SQLiteStore`."""

from kem.stores.sqlite import SQLiteStore

__all__ = ["SQLiteStore"]
