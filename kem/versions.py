"""Published model versions under the models folder (``KEM_MODELS_DIR``, default ``<KEM_HOME>/models/``):
the bookkeeping consolidation, ``kem serve`` and the CLI share (list, resolve ``vN`` / ``current`` /
``base``, absorbed versions, publish, roll back). No torch here: writing and loading weights stays in
:mod:`kem.consolidation.version_weights`. Build one with :func:`versions_for` (the settings' folder and store).

With a PostgreSQL edit store the versions are also recorded in the database (a :class:`VersionRegistry`,
:mod:`kem.stores.pg_versions`): the database says which version is ``current`` (replicas sharing the
models folder agree even if a local pointer file differs), publish and rollback notify the replicas
(``NOTIFY kem_versions``), and the weights stay in the folder. A version is recorded only once its folder
is complete; :func:`recover` records a folder the database missed. With SQLite, files only.

Layout::

    models/
      v1/                 a Hugging Face folder (config, model.safetensors, tokenizer), loadable by
                          kem.models.load_causal_lm / transformers, plus
                          delta.safetensors   the WeightDelta that made it from its parent
                          manifest.json       base, parent, method, hparams, edit ids, metrics, timings
      v2/ ...
      current             the name of the version served by default ("v2")
      tenants/<namespace>/  a tenant's own versions, same layout: vN/ (manifest.json with kind
                          "adapter", adapter/ a peft LoRA folder, optionally adapter_with_follower/)
                          and current

A tenant version (``VersionStore(home, namespace="alice")``) is a LoRA adapter over the shared version
it was computed on (its manifest's ``parent``; None: the base model). It is valid on that shared
version only: :meth:`VersionStore.adapter_on` refuses it on any other, and the tenant's edits are then
served by the fast path until ``kem consolidate --namespace alice`` recomputes an adapter on the new
shared version. A tenant's adapter is cumulative: ``alice/v2`` holds the edits of ``alice/v1`` too
(its ``tenant_parent``) when both sit on the same shared version. Edits a tenant version absorbed are
marked ``consolidated_in = "alice/v2"`` (:meth:`VersionStore.label`), so shared and tenant version
names never collide in the fast path's skip set.

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
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from kem.errors import ConflictError, NotFoundError, ValidationError
from kem.files import write_atomic

if TYPE_CHECKING:
    from kem.settings import Settings

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
BASE = "base"  # pseudo-version: the base model, nothing absorbed
CURRENT = "current"  # pseudo-version: what models/current points at
MANIFEST = "manifest.json"
DELTA = "delta.safetensors"
TENANTS = "tenants"  # models/tenants/<namespace>/: the tenants' own versions
ADAPTER = "adapter"  # a tenant version's peft LoRA folder
ADAPTER_WITH_FOLLOWER = "adapter_with_follower"  # the same plus the edit-follower's LoRA, one adapter
CHECKPOINT_KIND = "checkpoint"
ADAPTER_KIND = "adapter"


class Manifest(BaseModel):
    """What ``models/vN/manifest.json`` records about a version.

    Attributes:
        version: ``"vN"``.
        base: The base model (name or folder) the chain of versions started from.
        base_fingerprint: Fingerprint of the base weights (covariance statistics are keyed by it).
        kind: ``"checkpoint"`` (a shared version: a full model folder) or ``"adapter"`` (a tenant
            version: a LoRA folder ``adapter/`` over the shared version ``parent``).
        parent: The shared version this one was built on, or None when built on the base model.
        tenant_parent: A tenant version only: the tenant's earlier version whose edits this adapter
            also holds (None: it holds only its own ``edit_ids``).
        method: Consolidation method (``memit``, ``distill``, ``alphaedit``, ``rome``, ``ft-l``).
        hparams: The method's hyperparameters, as used.
        edit_ids: Edits absorbed by this version (marked ``consolidated_in`` = this version).
        failed_edit_ids: Edits that were in the delta but that the new weights alone did not answer in
            every form (cloze, paraphrases, chat question); they stay active, on the fast path.
        namespace: The namespace the job took edits from when it was one (else None); a tenant
            version's tenant.
        namespaces: Every namespace the job took edits from (shared namespaces only).
        metrics: Gate metrics (reliability, paraphrase, question, generalization, locality, perplexity,
            retired / kept counts) and thresholds. Shared and tenant versions written since issue 20 also
            carry ``edits`` (an extra field): per edit, its forms, answers and whether it was retired.
        timings: Seconds per step of the job.
        created_at: UTC time of publication.
    """

    model_config = ConfigDict(extra="allow")

    version: str
    kind: str = CHECKPOINT_KIND
    base: str
    base_fingerprint: str | None = None
    parent: str | None = None
    tenant_parent: str | None = None
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
        absorbed: The version and its ancestors (empty for the base model); for a tenant version
            their labels (``"alice/v2"``), as edits record them in ``consolidated_in``.
        namespace: The tenant (None: a shared version).
        parent: A tenant version only: the shared version its adapter applies to (None: the base model).
    """

    version: str
    path: Path | None
    absorbed: frozenset[str]
    namespace: str | None = None
    parent: str | None = None

    @property
    def lora(self) -> Path | None:
        """A tenant version's peft LoRA folder (None for shared versions and ``base``)."""
        return None if self.namespace is None or self.path is None else self.path / ADAPTER

    @property
    def lora_with_follower(self) -> Path | None:
        """A tenant version's adapter combined with the edit-follower, when it was built."""
        p = None if self.path is None or self.namespace is None else self.path / ADAPTER_WITH_FOLLOWER
        return p if p is not None and (p / "adapter_config.json").is_file() else None


class VersionRegistry(Protocol):
    """Where versions are recorded besides their folders, so several machines agree on ``current``
    (:class:`kem.stores.pg_versions.PostgresVersions`). ``namespace`` is '' for the shared versions."""

    def current(self, namespace: str) -> tuple[bool, str | None]:
        """``(recorded, version)``: whether a current version is recorded, and which (None: base)."""
        ...

    def manifests(self, namespace: str) -> builtins.list[dict[str, Any]]: ...

    def manifest(self, namespace: str, version: str) -> dict[str, Any] | None: ...

    def namespaces(self) -> builtins.list[str]: ...

    def record(self, namespace: str, manifest: dict[str, Any], created_at: datetime, make_current: bool) -> None:
        """Record a complete version (and make it current, notifying replicas)."""
        ...

    def set_current(self, namespace: str, version: str | None) -> None: ...

    def close(self) -> None: ...


def check_name(version: str) -> str:
    """``version`` if it is of the form ``vN`` (N >= 1), else a :class:`ValidationError`."""
    if not VERSION_RE.fullmatch(version or ""):
        raise ValidationError(f"a model version is written vN with N >= 1, e.g. v1 (got {version!r})", field="version")
    return version


def check_namespace(namespace: str) -> str:
    """``namespace`` if it is a valid tenant name (as :class:`kem.edit.Edit` validates it), else a
    :class:`ValidationError` naming the field."""
    from kem.edit import NAMESPACE_RE

    if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
        raise ValidationError("a namespace starts with a letter or digit and uses only letters, digits, _ . @ : - "
                              f"(got {namespace!r})", field="namespace")
    return namespace


class VersionStore:
    """The published versions under the models folder (shared), or a tenant's under
    ``<models>/tenants/<namespace>`` (LoRA adapters over a shared version).

    Args:
        home: kem's data folder (``Settings.home``).
        namespace: None for the shared versions; a tenant namespace for that tenant's versions.
        models_dir: The models folder (``Settings.models_root()``; default ``<home>/models``).
        registry: Where versions are also recorded (a PostgreSQL store's tables); None: files only.
            The database's ``current`` wins over the pointer file once it names one.
        owns_registry: :meth:`close` closes ``registry``.
    """

    def __init__(self, home: str | os.PathLike[str], namespace: str | None = None, *,
                 models_dir: str | os.PathLike[str] | None = None, registry: VersionRegistry | None = None,
                 owns_registry: bool = False) -> None:
        self.home = Path(home).expanduser()
        self.namespace = None if namespace is None else check_namespace(namespace)
        self.models = Path(models_dir).expanduser() if models_dir is not None else self.home / "models"
        self.root = self.models if namespace is None else self.models / TENANTS / namespace
        self.registry = registry
        self._owns_registry = owns_registry

    def __repr__(self) -> str:
        ns = "" if self.namespace is None else f", namespace={self.namespace!r}"
        return f"VersionStore({str(self.models)!r}{ns})"

    def __enter__(self) -> VersionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the registry's connection if this store opened it (:func:`versions_for`)."""
        if self.registry is not None and self._owns_registry:
            self.registry.close()

    @property
    def _key(self) -> str:
        return self.namespace or ""

    def of(self, namespace: str | None) -> VersionStore:
        """The versions of ``namespace`` (None: the shared ones) in the same folder and registry."""
        if namespace == self.namespace:
            return self
        return VersionStore(self.home, namespace, models_dir=self.models, registry=self.registry)

    def label(self, version: str) -> str:
        """How edits absorbed by ``version`` record it in ``consolidated_in``: ``vN`` for a shared
        version, ``<namespace>/vN`` for a tenant's."""
        return version if self.namespace is None else f"{self.namespace}/{version}"

    def tenants(self) -> builtins.list[str]:
        """Namespaces with a tenant version folder under ``<models>/tenants`` or recorded versions (sorted)."""
        root = self.models / TENANTS
        found = set(self.registry.namespaces()) if self.registry is not None else set()
        if root.is_dir():
            found |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        return sorted(found)

    def shared(self) -> VersionStore:
        """The shared versions' store of the same folder (and registry)."""
        return self.of(None)

    # ---- reading ------------------------------------------------------------------------------------
    def path(self, version: str) -> Path:
        """Folder of a published ``vN``; :class:`NotFoundError` when it does not exist."""
        path = self.root / check_name(version)
        if not (path / MANIFEST).is_file():
            whose = "" if self.namespace is None else f" of namespace {self.namespace!r}"
            if self.registry is not None and self.registry.manifest(self._key, version) is not None:
                raise NotFoundError(f"model version {version!r}{whose} is recorded in the database but its folder "
                                    f"{path} is missing: every replica must see the same models folder "
                                    "(set KEM_MODELS_DIR to the shared folder)")
            known = ", ".join(m.version for m in self.list()) or "none published yet"
            raise NotFoundError(f"model version {version!r}{whose} does not exist under {self.root} (known: {known})")
        return path

    def manifest(self, version: str) -> Manifest:
        """The manifest of a published ``vN`` (the database's copy when recorded there)."""
        if self.registry is not None:
            row = self.registry.manifest(self._key, check_name(version))
            if row is not None:
                return Manifest.model_validate(row)
        return Manifest.model_validate_json((self.path(version) / MANIFEST).read_text(encoding="utf-8"))

    def _folder_manifests(self) -> dict[str, Manifest]:
        found = {}
        if self.root.is_dir():
            for p in self.root.iterdir():
                if VERSION_RE.fullmatch(p.name) and (p / MANIFEST).is_file():
                    found[p.name] = Manifest.model_validate_json((p / MANIFEST).read_text(encoding="utf-8"))
        return found

    def list(self) -> list[Manifest]:
        """Every published version, oldest first (temporary folders of running jobs are ignored): the
        recorded ones and any folder the registry does not know yet (:func:`recover` records it)."""
        found = self._folder_manifests()
        if self.registry is not None:
            found.update({m.version: m for m in map(Manifest.model_validate, self.registry.manifests(self._key))})
        return [found[v] for v in sorted(found, key=lambda v: int(v[1:]))]

    def current(self) -> str | None:
        """The version ``current`` points at, or None (the base model is served): the registry's when it
        records one, else the pointer file's."""
        if self.registry is not None:
            recorded, name = self.registry.current(self._key)
            if recorded:
                return None if name in (None, "", BASE) else name
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
        (``None`` / ``base``: empty). For a tenant: ``[version, its tenant_parent, ...]``."""
        chain: list[str] = []
        v = None if version in (None, BASE) else version
        while v is not None:
            if v in chain:
                raise ConflictError(f"model versions form a cycle through {v} (check {self.root}/*/{MANIFEST})")
            chain.append(v)
            man = self.manifest(v)
            v = man.parent if self.namespace is None else man.tenant_parent
        return chain

    def absorbed(self, version: str | None) -> frozenset[str]:
        """Versions whose edits are in ``version``'s weights: the version and its ancestors (for a
        tenant, their labels ``<namespace>/vN``, see :meth:`label`)."""
        return frozenset(self.label(v) for v in self.ancestors(version))

    def adapter_on(self, shared_version: str | None) -> ServedVersion | None:
        """A tenant's ``current`` version if its adapter applies to ``shared_version`` (None / ``base``:
        the base model), else None: nothing published, or the adapter was computed on another shared
        version (refused: its edits go back to the fast path until the next tenant job recomputes it)."""
        if self.namespace is None:
            raise ValidationError("adapter_on is for a tenant's versions: VersionStore(home, namespace=...)",
                                  field="namespace")
        cur = self.current()
        if cur is None:
            return None
        served = self.resolve(cur)
        want = None if shared_version in (None, BASE) else shared_version
        if served.parent != want:
            log.warning("adapter %s of namespace %r was computed on %s, not on the served %s: not applied "
                        "(run kem consolidate --namespace %s to recompute it)", cur, self.namespace,
                        served.parent or BASE, want or BASE, self.namespace)
            return None
        return served

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
            return ServedVersion(BASE, None, frozenset(), self.namespace)
        chain = self.ancestors(version)
        parent = self.manifest(version).parent if self.namespace is not None else None
        folder = self.path(version)  # the weights must be here (a recorded version's folder may not be)
        return ServedVersion(version, folder, frozenset(self.label(v) for v in chain), self.namespace, parent)

    def next_version(self) -> str:
        """The next free name: one more than the highest ``vN`` folder (published or being written) or
        recorded version."""
        top = 0
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = VERSION_RE.fullmatch(p.name)
                if m:
                    top = max(top, int(m.group(1)))
        if self.registry is not None:
            top = max([top] + [int(str(m["version"])[1:]) for m in self.registry.manifests(self._key)
                               if VERSION_RE.fullmatch(str(m.get("version", "")))])
        return f"v{top + 1}"

    # ---- writing ------------------------------------------------------------------------------------
    def set_current(self, version: str | None) -> None:
        """Point ``current`` at ``version`` (None or ``"base"``: the base model), atomically: in the registry
        first (which notifies the replicas), then the pointer file."""
        version = None if version in (None, BASE) else version
        if version is not None:
            self.path(version)  # must exist
        if self.registry is not None:
            self.registry.set_current(self._key, version)
        self._write_pointer(version)

    def _write_pointer(self, version: str | None) -> None:
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
        log.info("current model version%s is now %s", "" if self.namespace is None else f" of {self.namespace}", version)
        return man

    def publish(self, manifest: dict[str, Any], write: Callable[[Path], None], make_current: bool = True) -> Manifest:
        """Write a new version atomically and (by default) point ``current`` at it.

        ``write(folder)`` fills a temporary folder ``models/.tmp-vN-*`` (weights, tokenizer, delta...);
        the manifest is written last, then the folder is renamed to ``vN``. A failure removes the
        temporary folder and leaves every published version and ``current`` as they were. A file lock
        serialises concurrent publishers. With a registry the complete version is then recorded (and made
        current, notifying the replicas) in one transaction; if that fails the folder stays, not
        current, and :func:`recover` records it.

        Args:
            manifest: Fields of :class:`Manifest` except ``version`` and ``created_at``.
            write: Writes the version's files into the folder it is given.
            make_current: Point ``current`` at the new version.
        """
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".publish.lock"), timeout=600):
            version = self.next_version()
            if self.namespace is not None:
                manifest = {"kind": ADAPTER_KIND, **manifest, "namespace": self.namespace}
            man = Manifest(version=version, **manifest)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.root))
            try:
                write(tmp)
                (tmp / MANIFEST).write_text(man.model_dump_json(indent=1), encoding="utf-8")
                os.rename(tmp, self.root / version)  # atomic; fails if vN appeared meanwhile
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if self.registry is not None:
                self.registry.record(self._key, man.model_dump(mode="json"), man.created_at, make_current)
            if make_current:
                self._write_pointer(version)
        log.info("published model version %s (%d edits, method %s)", self.label(version), len(man.edit_ids), man.method)
        return man


def registry_for(settings: Settings) -> VersionRegistry | None:
    """Where the store ``settings.store`` names records versions besides their folders (a PostgreSQL
    store's tables, connected on first use; the caller closes it), or None (a local store: folders only):
    the store's :meth:`~kem.stores.services.StoreServices.version_registry`."""
    from kem.stores import services_for

    return services_for(settings.store).version_registry()


def versions_for(settings: Settings, namespace: str | None = None, *, home: str | os.PathLike[str] | None = None) -> VersionStore:
    """The :class:`VersionStore` a command uses: the settings' models folder (``KEM_MODELS_DIR``, default
    ``<home>/models``) and, when ``settings.store`` names PostgreSQL, the versions recorded in its schema
    (:class:`kem.stores.pg_versions.PostgresVersions`, connected on first use). Close it when done.

    Args:
        settings: kem settings (``home``, ``models_dir``, ``store``).
        namespace: A tenant's versions instead of the shared ones.
        home: Overrides ``settings.home`` (and the default models folder under it).
    """
    if home is not None:
        settings = settings.model_copy(update={"home": Path(home)})
    registry = registry_for(settings)
    return VersionStore(settings.home, namespace, models_dir=settings.models_root(), registry=registry,
                        owns_registry=registry is not None)


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` repaired: temporary folders removed, edits marked, version folders recorded in
    the registry; and what it could not: recorded versions whose folder is missing here."""

    removed: tuple[str, ...] = ()
    marked: tuple[tuple[str, str], ...] = ()  # (edit id, version)
    recorded: tuple[str, ...] = ()  # labels (v3, alice/v1) recorded in the registry from their folders
    missing: tuple[str, ...] = ()  # labels recorded in the registry with no folder under this models folder


def recover(versions: VersionStore, store: Any) -> Recovery:
    """Finish what a killed job left half done; run before a job takes edits and when a server starts.

    * A kill during publish leaves ``models/.tmp-vN-*``: removed (unless a publisher holds the lock).
    * A kill between publishing ``vN`` and marking its edits leaves them ``active``: the manifest is
      the journal, so every edit it lists that is still active and was not changed after ``vN`` was
      published is marked ``consolidated_in = vN`` (else the next job would consolidate it again).
    * With a registry (PostgreSQL): a complete version folder the database does not record (a publish
      that failed after the rename, or versions from before the store was PostgreSQL) is recorded, not
      made current; a namespace whose database records no ``current`` takes its pointer file's. A
      recorded version with no folder here is reported (``missing``) and left alone: this machine's
      models folder is not the shared one, or a folder was deleted by hand.

    Given the shared store, the tenants' versions (``models/tenants/*``) are recovered too (their edits
    marked with the tenant label, ``alice/vN``); given a tenant's store, that tenant's only.
    """
    from filelock import FileLock, Timeout

    from kem.edit import EditStatus
    from kem.errors import NotFoundError as _Missing

    stores = [versions]
    if versions.namespace is None:
        stores += [versions.of(ns) for ns in versions.tenants()]
    removed: list[str] = []
    marked: list[tuple[str, str]] = []
    recorded: list[str] = []
    missing: list[str] = []
    for vs in stores:
        if vs.root.is_dir():
            try:
                with FileLock(str(vs.root / ".publish.lock"), timeout=0):
                    for p in vs.root.glob(".tmp-v*"):
                        if p.is_dir():
                            shutil.rmtree(p, ignore_errors=True)
                            removed.append(p.name if vs.namespace is None else f"{TENANTS}/{vs.namespace}/{p.name}")
            except Timeout:  # a publisher is writing its temporary folder right now
                pass
        if vs.registry is not None:
            folders = vs._folder_manifests()
            known = {str(m["version"]) for m in vs.registry.manifests(vs._key)}
            for name in sorted(set(folders) - known, key=lambda v: int(v[1:])):
                vs.registry.record(vs._key, folders[name].model_dump(mode="json"), folders[name].created_at, False)
                recorded.append(vs.label(name))
            missing += [vs.label(v) for v in sorted(known - set(folders), key=lambda v: int(v[1:]))]
            if not vs.registry.current(vs._key)[0] and (vs.root / CURRENT).is_file():
                pointer = (vs.root / CURRENT).read_text(encoding="utf-8").strip()
                if pointer in ("", BASE) or pointer in folders:
                    vs.registry.set_current(vs._key, None if pointer in ("", BASE) else pointer)
                    recorded.append(f"{vs.label('current')}={pointer}")
        for man in vs.list():
            todo = []
            for edit_id in man.edit_ids:
                try:
                    e = store.get(edit_id)
                except _Missing:
                    continue
                if e.status == EditStatus.active and e.updated_at <= man.created_at:
                    todo.append(edit_id)
            if todo:
                store.mark_consolidated(todo, vs.label(man.version))
                marked += [(i, vs.label(man.version)) for i in todo]
    if removed or marked:
        log.warning("recovered from an interrupted consolidation: removed %s, marked %d edits consolidated",
                    removed or "nothing", len(marked))
    if recorded:
        log.warning("recorded in the database what only the models folder %s held: %s", versions.models, recorded)
    if missing:
        log.warning("versions recorded in the database have no folder under %s: %s (is KEM_MODELS_DIR the shared "
                    "models folder?)", versions.models, missing)
    return Recovery(tuple(removed), tuple(marked), tuple(recorded), tuple(missing))
