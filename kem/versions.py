"""Published model versions under ``<KEM_HOME>/models/``: the bookkeeping consolidation, ``kem serve`` and
the CLI share (list, resolve ``vN`` / ``current`` / ``base``, absorbed versions, publish, roll back).
No torch here: writing and loading weights stays in :mod:`kem.consolidation.versions`.

Layout::

    models/
      v1/                 a Hugging Face folder (config, model.safetensors, tokenizer), loadable by
                          kem.models.load_causal_lm / transformers, plus
                          delta.safetensors   the WeightDelta that made it from its parent
                          manifest.json       base, parent, method, hparams, edit ids, metrics, timings
      v2/ ...
      current             the name of the version served by default ("v2")

A version is written into a temporary folder beside the others and renamed into place, and
``current`` is replaced atomically, so a crash never leaves a half-written ``vN`` or pointer.
Versions are never deleted: :meth:`VersionStore.rollback` only moves ``current``. A version's weights
hold the edits of the version and of its ancestors (parent chain), which is what
:meth:`VersionStore.absorbed` returns: serving vN skips exactly those edits on the fast path, so after
a rollback to vN the edits absorbed by later versions are applied in context again.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kem.errors import ConflictError, NotFoundError, ValidationError
from kem.files import write_atomic

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
BASE = "base"  # pseudo-version: the base model, nothing absorbed
CURRENT = "current"  # pseudo-version: what models/current points at
MANIFEST = "manifest.json"
DELTA = "delta.safetensors"


class Manifest(BaseModel):
    """What ``models/vN/manifest.json`` records about a version.

    Attributes:
        version: ``"vN"``.
        base: The base model (name or folder) the chain of versions started from.
        base_fingerprint: Fingerprint of the base weights (covariance statistics are keyed by it).
        parent: The version this one was built on, or None when built on the base model.
        method: Consolidation method (``memit``, ``alphaedit``, ``rome``, ``ft-l``).
        hparams: The method's hyperparameters, as used.
        edit_ids: Edits absorbed by this version (marked ``consolidated_in`` = this version).
        failed_edit_ids: Edits that were in the delta but did not pass reliability; they stay active.
        namespace: The namespace the job took edits from when it was one (else None).
        namespaces: Every namespace the job took edits from (shared namespaces only).
        metrics: Gate metrics (reliability, locality, ...) and thresholds.
        timings: Seconds per step of the job.
        created_at: UTC time of publication.
    """

    model_config = ConfigDict(extra="allow")

    version: str
    base: str
    base_fingerprint: str | None = None
    parent: str | None = None
    method: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    edit_ids: list[str] = Field(default_factory=list)
    failed_edit_ids: list[str] = Field(default_factory=list)
    namespace: str | None = None
    namespaces: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class ServedVersion:
    """A model version to serve (what :meth:`VersionStore.resolve` returns).

    Attributes:
        version: ``vN``, or ``base`` for the base model.
        path: Its model folder (``None`` for ``base``: the caller resolves the base model itself).
        absorbed: The version and its ancestors (empty for the base model).
    """

    version: str
    path: Path | None
    absorbed: frozenset[str]


def check_name(version: str) -> str:
    """``version`` if it is of the form ``vN`` (N >= 1), else a :class:`ValidationError`."""
    if not VERSION_RE.fullmatch(version or ""):
        raise ValidationError(f"a model version is written vN with N >= 1, e.g. v1 (got {version!r})", field="version")
    return version


class VersionStore:
    """The published versions under ``<home>/models``.

    Args:
        home: kem's data folder (``Settings.home``).
    """

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home).expanduser()
        self.root = self.home / "models"

    def __repr__(self) -> str:
        return f"VersionStore({str(self.home)!r})"

    # ---- reading ------------------------------------------------------------------------------------
    def path(self, version: str) -> Path:
        """Folder of a published ``vN``; :class:`NotFoundError` when it does not exist."""
        path = self.root / check_name(version)
        if not (path / MANIFEST).is_file():
            known = ", ".join(m.version for m in self.list()) or "none published yet"
            raise NotFoundError(f"model version {version!r} does not exist under {self.root} (known: {known})")
        return path

    def manifest(self, version: str) -> Manifest:
        """The manifest of a published ``vN``."""
        return Manifest.model_validate_json((self.path(version) / MANIFEST).read_text(encoding="utf-8"))

    def list(self) -> list[Manifest]:
        """Every published version, oldest first (temporary folders of running jobs are ignored)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = VERSION_RE.fullmatch(p.name)
            if m and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), Manifest.model_validate_json((p / MANIFEST).read_text(encoding="utf-8"))))
        return [man for _, man in sorted(found, key=lambda x: x[0])]

    def current(self) -> str | None:
        """The version ``current`` points at, or None (the base model is served)."""
        path = self.root / CURRENT
        if not path.is_file():
            return None
        name = path.read_text(encoding="utf-8").strip()
        return None if name in ("", BASE) else name

    def is_published(self, version: str) -> bool:
        """Whether :meth:`resolve` can serve ``version``: a published ``vN``, ``current`` or ``base``."""
        if version in (BASE, CURRENT):
            return True
        return bool(VERSION_RE.fullmatch(version or "")) and (self.root / version / MANIFEST).is_file()

    def ancestors(self, version: str | None) -> builtins.list[str]:
        """``[version, its parent, ...]`` back to the first version built on the base model
        (``None`` / ``base``: empty)."""
        chain: list[str] = []
        v = None if version in (None, BASE) else version
        while v is not None:
            if v in chain:
                raise ConflictError(f"model versions form a cycle through {v} (check {self.root}/*/{MANIFEST})")
            chain.append(v)
            v = self.manifest(v).parent
        return chain

    def absorbed(self, version: str | None) -> frozenset[str]:
        """Versions whose edits are in ``version``'s weights: the version and its ancestors."""
        return frozenset(self.ancestors(version))

    def resolve(self, version: str) -> ServedVersion:
        """``vN`` / ``current`` / ``base`` to the folder to load and the absorbed versions.

        Raises:
            NotFoundError: ``version`` is not published.
            ValidationError: ``version`` is not of the form ``vN`` (nor ``current`` / ``base``).
            ConflictError: the manifests' ``parent`` links form a cycle.
        """
        if version == CURRENT:
            version = self.current() or BASE
        if version == BASE:
            return ServedVersion(BASE, None, frozenset())
        chain = self.ancestors(version)
        return ServedVersion(version, self.root / version, frozenset(chain))

    def next_version(self) -> str:
        """The next free name: one more than the highest ``vN`` folder (published or being written)."""
        top = 0
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = VERSION_RE.fullmatch(p.name)
                if m:
                    top = max(top, int(m.group(1)))
        return f"v{top + 1}"

    # ---- writing ------------------------------------------------------------------------------------
    def set_current(self, version: str | None) -> None:
        """Point ``current`` at ``version`` (None or ``"base"``: the base model), atomically."""
        if version not in (None, BASE):
            self.path(version)  # must exist
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / CURRENT, (version or BASE) + "\n", new_mode=0o644)

    def rollback(self, version: str) -> Manifest | None:
        """Serve ``version`` (or ``"base"``) from now on; nothing is deleted.

        Edits absorbed by versions that are not ``version`` or its ancestors become served by the fast
        path again for it (see :meth:`absorbed`). Returns the version's manifest (None for the base).
        """
        if version == BASE:
            self.set_current(None)
            return None
        man = self.manifest(version)
        self.set_current(version)
        log.info("current model version is now %s", version)
        return man

    def publish(self, manifest: dict[str, Any], write: Callable[[Path], None], make_current: bool = True) -> Manifest:
        """Write a new version atomically and (by default) point ``current`` at it.

        ``write(folder)`` fills a temporary folder ``models/.tmp-vN-*`` (weights, tokenizer, delta...);
        the manifest is written last, then the folder is renamed to ``vN``. A failure removes the
        temporary folder and leaves every published version and ``current`` as they were. A file lock
        serialises concurrent publishers.

        Args:
            manifest: Fields of :class:`Manifest` except ``version`` and ``created_at``.
            write: Writes the version's files into the folder it is given.
            make_current: Point ``current`` at the new version.
        """
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".publish.lock"), timeout=600):
            version = self.next_version()
            man = Manifest(version=version, **manifest)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.root))
            try:
                write(tmp)
                (tmp / MANIFEST).write_text(man.model_dump_json(indent=1), encoding="utf-8")
                os.rename(tmp, self.root / version)  # atomic; fails if vN appeared meanwhile
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if make_current:
                self.set_current(version)
        log.info("published model version %s (%d edits, method %s)", version, len(man.edit_ids), man.method)
        return man


@dataclass(frozen=True)
class Recovery:
    """What :meth:`VersionStore.recover` repaired: temporary folders removed, edits marked."""

    removed: tuple[str, ...] = ()
    marked: tuple[tuple[str, str], ...] = ()  # (edit id, version)


def recover(versions: VersionStore, store: Any) -> Recovery:
    """Finish what a killed job left half done; run before a job takes edits and when a server starts.

    * A kill during publish leaves ``models/.tmp-vN-*``: removed (unless a publisher holds the lock).
    * A kill between publishing ``vN`` and marking its edits leaves them ``active``: the manifest is
      the journal, so every edit it lists that is still active and was not changed after ``vN`` was
      published is marked ``consolidated_in = vN`` (else the next job would consolidate it again).
    """
    from filelock import FileLock, Timeout

    from kem.edit import EditStatus
    from kem.errors import NotFoundError as _Missing

    removed: list[str] = []
    if versions.root.is_dir():
        try:
            with FileLock(str(versions.root / ".publish.lock"), timeout=0):
                for p in versions.root.glob(".tmp-v*"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(p.name)
        except Timeout:  # a publisher is writing its temporary folder right now
            pass
    marked: list[tuple[str, str]] = []
    for man in versions.list():
        todo = []
        for edit_id in man.edit_ids:
            try:
                e = store.get(edit_id)
            except _Missing:
                continue
            if e.status == EditStatus.active and e.updated_at <= man.created_at:
                todo.append(edit_id)
        if todo:
            store.mark_consolidated(todo, man.version)
            marked += [(i, man.version) for i in todo]
    if removed or marked:
        log.warning("recovered from an interrupted consolidation: removed %s, marked %d edits consolidated",
                    removed or "nothing", len(marked))
    return Recovery(tuple(removed), tuple(marked))
