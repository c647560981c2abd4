"""Published model versions under ``<KEM_HOME>/models/``: list, show, publish, roll back, serve.

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
Versions are never deleted: :func:`rollback` only moves ``current``. A version's weights hold the
edits of the version and of its ancestors (parent chain), which is what :func:`absorbed` returns:
serving vN skips exactly those edits on the fast path, so after a rollback to vN the edits absorbed
by later versions are applied in context again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kem.errors import ConflictError, NotFoundError, ValidationError

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
BASE = "base"  # pseudo-version: the base model, nothing absorbed
MANIFEST = "manifest.json"
DELTA = "delta.safetensors"
CURRENT = "current"


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


# ---- paths ------------------------------------------------------------------------------------------
def models_dir(home: str | os.PathLike[str]) -> Path:
    """``<home>/models``."""
    return Path(home).expanduser() / "models"


def check_name(version: str) -> str:
    """``version`` if it is of the form ``vN`` (N >= 1), else a :class:`ValidationError`."""
    if not VERSION_RE.fullmatch(version or ""):
        raise ValidationError(f"a model version is written vN with N >= 1, e.g. v1 (got {version!r})", field="version")
    return version


def version_dir(home: str | os.PathLike[str], version: str) -> Path:
    """Folder of a published version; :class:`NotFoundError` when it does not exist."""
    path = models_dir(home) / check_name(version)
    if not (path / MANIFEST).is_file():
        known = ", ".join(m.version for m in list_versions(home)) or "none published yet"
        raise NotFoundError(f"model version {version!r} does not exist under {models_dir(home)} (known: {known})")
    return path


# ---- reading ----------------------------------------------------------------------------------------
def get_manifest(home: str | os.PathLike[str], version: str) -> Manifest:
    """The manifest of ``version``."""
    path = version_dir(home, version) / MANIFEST
    return Manifest.model_validate_json(path.read_text(encoding="utf-8"))


def list_versions(home: str | os.PathLike[str]) -> list[Manifest]:
    """Every published version, oldest first (temporary folders of running jobs are ignored)."""
    root = models_dir(home)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = VERSION_RE.fullmatch(p.name)
        if m and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), Manifest.model_validate_json((p / MANIFEST).read_text(encoding="utf-8"))))
    return [man for _, man in sorted(found, key=lambda x: x[0])]


def current_version(home: str | os.PathLike[str]) -> str | None:
    """The version ``current`` points at, or None (the base model is served)."""
    path = models_dir(home) / CURRENT
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8").strip()
    return None if name in ("", BASE) else name


def ancestors(home: str | os.PathLike[str], version: str | None) -> list[str]:
    """``[version, its parent, ...]`` back to the first version built on the base model."""
    chain: list[str] = []
    v = None if version in (None, BASE) else version
    while v is not None:
        if v in chain:
            raise ConflictError(f"model versions form a cycle through {v} (check {models_dir(home)}/*/{MANIFEST})")
        chain.append(v)
        v = get_manifest(home, v).parent
    return chain


def absorbed(home: str | os.PathLike[str], version: str | None) -> frozenset[str]:
    """Versions whose edits are in ``version``'s weights: the version and its ancestors."""
    return frozenset(ancestors(home, version))


def next_version(home: str | os.PathLike[str]) -> str:
    """The next free name: one more than the highest ``vN`` folder (published or being written)."""
    root = models_dir(home)
    top = 0
    if root.is_dir():
        for p in root.iterdir():
            m = VERSION_RE.fullmatch(p.name)
            if m:
                top = max(top, int(m.group(1)))
    return f"v{top + 1}"


# ---- writing ----------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_current(home: str | os.PathLike[str], version: str | None) -> None:
    """Point ``current`` at ``version`` (None or ``"base"``: the base model), atomically."""
    if version not in (None, BASE):
        version_dir(home, version)  # must exist
    root = models_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / CURRENT, (version or BASE) + "\n")


def rollback(home: str | os.PathLike[str], version: str) -> Manifest | None:
    """Serve ``version`` (or ``"base"``) from now on; nothing is deleted.

    Edits absorbed by versions that are not ``version`` or its ancestors become served by the fast
    path again for it (see :func:`absorbed`). Returns the version's manifest (None for the base).
    """
    if version == BASE:
        set_current(home, None)
        return None
    man = get_manifest(home, version)
    set_current(home, version)
    log.info("current model version is now %s", version)
    return man


def publish(home: str | os.PathLike[str], model: Any, tok: Any, delta: Any, manifest: dict[str, Any],
            extra_files: dict[str, Any] | None = None, make_current: bool = True) -> Manifest:
    """Write a new version atomically and (by default) point ``current`` at it.

    Everything is written into ``models/.tmp-vN-*`` first (weights with ``save_pretrained``, the
    tokenizer, ``delta.safetensors``, the manifest, then ``extra_files``: name -> ``fn(path)``), then
    the folder is renamed to ``vN``. A failure removes the temporary folder and leaves every
    published version and ``current`` as they were. A file lock serialises concurrent publishers.

    Args:
        manifest: Fields of :class:`Manifest` except ``version`` and ``created_at``.
    """
    from filelock import FileLock

    root = models_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".publish.lock"), timeout=600):
        version = next_version(home)
        man = Manifest(version=version, **manifest)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=root))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            delta.save(tmp / DELTA)
            for name, write in (extra_files or {}).items():
                write(tmp / name)
            (tmp / MANIFEST).write_text(man.model_dump_json(indent=1), encoding="utf-8")
            os.rename(tmp, root / version)  # atomic; fails if vN appeared meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            set_current(home, version)
    log.info("published model version %s (%d edits, method %s)", version, len(man.edit_ids), man.method)
    return man


# ---- serving ----------------------------------------------------------------------------------------
def load_version(home: str | os.PathLike[str], version: str | None, settings: Any = None,
                 device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a version (``None`` / ``"base"``: the base model of ``settings``)."""
    from kem.models import load_causal_lm
    from kem.settings import Settings

    settings = settings or Settings()
    device = device or settings.resolved_device()
    if version in (None, BASE):
        return load_causal_lm(settings.model, settings.cache_dir, device=device, dtype=dtype)
    return load_causal_lm(version_dir(home, version), settings.cache_dir, device=device, dtype=dtype)


def use_version(ke: Any, version: str) -> None:
    """Serve ``version`` from a :class:`~kem.editor.KnowledgeEditor`: its generator becomes a
    :class:`~kem.adapters.transformers.TransformersGenerator` over the version's weights, and its
    ``absorbed_versions`` the version and its ancestors (so the fast path skips their edits).

    ``version`` may be ``"current"`` (what ``models/current`` points at) or ``"base"``.
    """
    from kem.adapters.transformers import TransformersGenerator

    home = ke.settings.home
    if version == CURRENT:
        version = current_version(home) or BASE
    chain = absorbed(home, version)
    from kem.follower.registry import follower_for

    model, tok = load_version(home, version, ke.settings)
    ke.generator = TransformersGenerator(model, tok, name=f"{ke.settings.model}@{version}",
                                         follower=follower_for(ke.settings))  # the base model's follower
    ke.absorbed_versions = chain
    log.info("serving model version %s (fast path skips edits of %s)", version, sorted(chain) or "none")
