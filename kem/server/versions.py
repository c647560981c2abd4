"""Model versions published by consolidation, as ``kem serve`` sees them: a name (``vN``, ``current``,
``base``) to a model folder and the versions whose edits that folder's weights hold.

Consolidation writes ``<KEM_HOME>/models/vN/`` (a Hugging Face folder + ``manifest.json`` with its
``parent``) and a ``current`` pointer (:mod:`kem.consolidation.versions`). The server only reads them:
the manifests' ``parent`` chain gives the absorbed versions, so the fast path skips exactly the edits
baked into the weights being served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kem.errors import ConflictError, NotFoundError

BASE = "base"
CURRENT = "current"


@dataclass(frozen=True)
class ServedVersion:
    """A model version to serve.

    Attributes:
        version: ``vN``, or ``base`` for the base model.
        path: Its model folder (``None`` for ``base`` when the caller resolves the base model itself).
        absorbed: The version and its ancestors (empty for the base model).
    """

    version: str
    path: Path | None
    absorbed: frozenset[str]


def _models(home: str | Path) -> Path:
    return Path(home).expanduser() / "models"


def _manifest(home: str | Path, version: str) -> dict[str, Any] | None:
    path = _models(home) / version / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def is_published(home: str | Path, version: str) -> bool:
    """Whether ``version`` names something :func:`resolve` can serve (a published ``vN``, current, base)."""
    return version in (BASE, CURRENT) or _manifest(home, version) is not None


def resolve(home: str | Path, version: str) -> ServedVersion:
    """``vN`` / ``current`` / ``base`` to the folder to load and the absorbed versions.

    Raises:
        NotFoundError: ``version`` is not published under ``<home>/models``.
        ConflictError: the manifests' ``parent`` links form a cycle.
    """
    if version == CURRENT:
        pointer = _models(home) / CURRENT
        version = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else BASE
        version = version or BASE
    if version == BASE:
        return ServedVersion(BASE, None, frozenset())
    chain: list[str] = []
    v: str | None = version
    while v:
        if v in chain:
            raise ConflictError(f"model versions form a cycle through {v} (check {_models(home)}/*/manifest.json)")
        man = _manifest(home, v)
        if man is None:
            known = sorted(p.name for p in _models(home).glob("v*") if (p / "manifest.json").is_file())
            raise NotFoundError(f"model version {v!r} is not published under {_models(home)} "
                                f"(known: {', '.join(known) or 'none'})")
        chain.append(v)
        v = man.get("parent")
    return ServedVersion(version, _models(home) / version, frozenset(chain))
