"""Edit memory: the store (source of truth) + embeddings + the derived FAISS index, kept in step.

Every read first compares the store's revision with the index's (one cheap SQLite query) and replays
the store's history since then, so edits written by another process (the CLI while a server runs)
are seen at once. A missing, corrupt or foreign index is rebuilt from the store's saved embeddings.

On a store whose services announce writes (PostgreSQL, shared by several replicas), the editor sets
:attr:`EditMemory.syncer` (a :class:`~kem.sync.Syncer`, :meth:`kem.editor.KnowledgeEditor.open`): changes are
applied in the background as soon as ``LISTEN/NOTIFY`` announces them, and reads learn the store's revision
from the notifications instead of a query.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kem.edit import Edit, EditStatus, utcnow
from kem.index import DEFAULT_ANN_THRESHOLD, NamespacedIndex
from kem.protocols import ChangeFeed, EditStore, Embedder
from kem.relations import DEFAULT_THRESHOLD, RelationMatcher
from kem.stores.rules import HELD, LIVE, check_policy

log = logging.getLogger(__name__)

OVERFETCH = 4  # search() asks the index for this many times k hits before the time filter


class EditMemory:
    """Keeps a :class:`~kem.index.NamespacedIndex` in step with an :class:`~kem.protocols.EditStore`.

    Args:
        store: The edit store.
        embedder: Embeds retrieval keys and queries.
        index_dir: Where the index is saved (``None``: memory only).
        ann_threshold: Vectors per namespace above which search leaves exact (flat) search for HNSW;
            ``None`` keeps every namespace exact. See :class:`~kem.index.NamespacedIndex`.
        supersede_threshold: Template cosine at or above which a new edit states the same relation as a
            live edit of its subject (:class:`~kem.relations.RelationMatcher`); ``None``: exact relation
            keys only (the store's own rule).
    """

    def __init__(self, store: EditStore, embedder: Embedder, index_dir: str | Path | None = None,
                 ann_threshold: int | None = DEFAULT_ANN_THRESHOLD,
                 supersede_threshold: float | None = DEFAULT_THRESHOLD) -> None:
        self.store = store
        self.embedder = embedder
        self.matcher = RelationMatcher(embedder, supersede_threshold) if supersede_threshold is not None else None
        self.index_dir = Path(index_dir) if index_dir else None
        self.ann_threshold = ann_threshold
        self._lock = threading.RLock()
        self._dirty = False
        self.syncer: ChangeFeed | None = None  # set by KnowledgeEditor.open on a notifying store
        self.index = self._open_index()
        self.sync()

    def close(self) -> None:
        """Stop the background sync (if any) and save the index; the store stays open (its owner closes it)."""
        syncer, self.syncer = self.syncer, None
        if syncer is not None:
            syncer.close()
        self.save()

    # ---- index life cycle -------------------------------------------------------------------------
    def _open_index(self) -> NamespacedIndex:
        if self.index_dir is not None and (self.index_dir / "meta.json").is_file():
            try:
                idx, info = NamespacedIndex.load(self.index_dir, self.ann_threshold)
                if info.get("embedder") == self.embedder.name and idx.dim == self.embedder.dim \
                        and idx.revision <= self.store.revision():
                    return idx
                log.warning("index at %s is for another embedder or a newer store: rebuilding", self.index_dir)
            except Exception as exc:  # corrupt or partial files: the store has everything
                log.warning("index at %s is unreadable (%s): rebuilding from the store", self.index_dir, exc)
        elif self.index_dir is not None:
            log.info("no index at %s: building it from the store", self.index_dir)
        return self.rebuild(save=False)

    def rebuild(self, save: bool = True, progress: bool = False) -> NamespacedIndex:
        """Build a fresh index from every edit in the store that applies at some time (active,
        consolidated, superseded; re-embedding only what lacks vectors)."""
        with self._lock:
            rev = self.store.revision()
            idx = NamespacedIndex(self.embedder.dim, self.ann_threshold)
            total = self.store.count(status=None)
            page, offset = 2000, 0
            with tqdm(total=total, desc="indexing edits", disable=not progress, unit="edit") as bar:
                while True:
                    edits = self.store.list(status=HELD, limit=page, offset=offset)
                    if not edits:
                        break
                    _add_grouped(idx, edits, self._vectors_for(edits))
                    offset += page
                    bar.update(len(edits))
            idx.revision = rev
            self.index = idx
            self._dirty = True
            if save:
                self.save()
            return idx

    def _vectors_for(self, edits: Sequence[Edit]) -> list[np.ndarray]:
        """Key vectors for ``edits``: from the store, embedding (and saving) the missing ones."""
        have = self.store.embeddings([e.id for e in edits], self.embedder.name)
        missing = [e for e in edits if e.id not in have or len(have[e.id]) != len(e.retrieval_keys())]
        if missing:
            for e, v in zip(missing, self.embed_edits(missing), strict=True):
                self.store.put_embeddings(e.id, self.embedder.name, v)
                have[e.id] = v
        return [have[e.id] for e in edits]

    def embed_edits(self, edits: Sequence[Edit], progress: bool = False) -> list[np.ndarray]:
        """Embed every edit's retrieval keys in one batch; returns one ``(n_keys, dim)`` array per edit."""
        keys = [e.retrieval_keys() for e in edits]
        flat = [k for ks in keys for k in ks]
        chunks = range(0, len(flat), 1024)
        parts = [self.embedder.embed(flat[i:i + 1024])
                 for i in tqdm(chunks, desc="embedding", unit="chunk", disable=not progress or len(chunks) < 2)]
        vecs = np.concatenate(parts) if parts else np.zeros((0, self.embedder.dim), np.float32)
        out, i = [], 0
        for ks in keys:
            out.append(vecs[i:i + len(ks)])
            i += len(ks)
        return out

    def sync(self, ask_store: bool = False) -> None:
        """Replay the store's changes since the index's revision (cheap when nothing changed).

        Args:
            ask_store: Query the store's revision even when a healthy :class:`~kem.sync.Syncer` knows
                it from notifications (which makes the check free).
        """
        known = None if ask_store or self.syncer is None else self.syncer.known_revision()
        if known is not None:
            if known <= self.index.revision:
                return
        elif self.store.revision() == self.index.revision:
            return
        with self._lock:  # one writer at a time; searches go on (the index locks its partitions)
            rev = self.store.revision()  # again: another thread may have synced past the first read
            if rev == self.index.revision:
                return
            if rev < self.index.revision:  # the store went back in time (restored file): start over
                self.rebuild(save=False)
                return
            latest: dict[str, tuple[str, str, dict | None]] = {}
            for ch in self.store.changes_since(self.index.revision):
                latest[ch.edit_id] = (ch.op, ch.namespace, ch.snapshot)
            live: list[Edit] = []
            for edit_id, (op, ns, snap) in latest.items():
                edit = Edit.model_validate(snap) if snap and op != "delete" else None
                if edit is not None and edit.status in HELD:
                    live.append(edit)
                else:
                    self.index.remove(ns, edit_id)
            for start in range(0, len(live), 2000):
                chunk = live[start:start + 2000]
                pairs = [(e, v) for e, v in zip(chunk, self._vectors_for_existing(chunk), strict=True)
                         if v is not None]
                _add_grouped(self.index, [e for e, _ in pairs], [v for _, v in pairs])
            self.index.revision = rev
            self._dirty = True

    def _vectors_for_existing(self, edits: Sequence[Edit]) -> list[np.ndarray | None]:
        have = self.store.embeddings([e.id for e in edits], self.embedder.name)
        out: list[np.ndarray | None] = []
        for e in edits:
            v = have.get(e.id)
            if v is None or len(v) != len(e.retrieval_keys()):
                v = self.embed_edits([e])[0]
                try:
                    self.store.put_embeddings(e.id, self.embedder.name, v)
                except KeyError:  # deleted meanwhile
                    v = None
            out.append(v)
        return out

    def save(self) -> None:
        """Write the index beside the store (atomic), if it changed since the last save."""
        if self.index_dir is None or not self._dirty:
            return
        with self._lock:
            self.index.save(self.index_dir, {"embedder": self.embedder.name})
            self._dirty = False

    # ---- writes and reads ---------------------------------------------------------------------------
    def matches(self, edits: Sequence[Edit]) -> dict[str, list[str]]:
        """For each new edit, the live edits of its subject stating the same relation in other words
        (:class:`~kem.relations.RelationMatcher`; the store adds exact relation keys itself)."""
        new = [e for e in edits if e.status in LIVE]
        if self.matcher is None or not new:
            return {}
        live = self.store.live_for_subjects([(e.namespace, e.subject_key) for e in new])
        return self.matcher.matches(new, live)

    def _store(self, edits: Sequence[Edit], vecs: Sequence[np.ndarray], on_conflict: str) -> list[Edit]:
        return self.store.add_many(edits, vecs, self.embedder.name, on_conflict=on_conflict,
                                   matches=self.matches(edits) if on_conflict != "keep" else None)

    def add_many(self, edits: Iterable[Edit], progress: bool = False, batch_size: int | None = None,
                 on_conflict: str = "supersede") -> list[Edit]:
        """Embed and store edits, then index them.

        Args:
            edits: The edits (all validated before anything is written).
            progress: Show a progress bar.
            on_conflict: What a new edit does to a live edit of the same subject and relation (however
                phrased): ``supersede`` it (default), ``reject`` the new one (ConflictError), ``keep`` both.
            batch_size: ``None``: one transaction for all the edits (all or nothing). ``N``: one
                transaction per ``N`` edits, in order, embedding batch ``k + 1`` (on every core) while
                the store writes batch ``k``. If a batch fails, the batches before it stay stored (and
                are indexed), the failing batch and the ones after it are not written, and the error
                is raised with a note saying how many edits were stored.
        """
        check_policy(on_conflict)
        edits = [Edit.parse(e) for e in edits]
        if batch_size is None or len(edits) <= batch_size:
            vecs = self.embed_edits(edits, progress=progress)
            stored = self._store(edits, vecs, on_conflict)
            self.sync()
            return stored
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (got {batch_size})")
        return self._add_batched(edits, progress, batch_size, on_conflict)

    def review(self, edit_id: str, approve: bool, namespace: str | None = None,
               on_conflict: str = "supersede") -> Edit:
        """Approve (it then supersedes like a new edit) or reject a pending edit."""
        matches: list[str] = []
        if approve:
            e = self.store.get(edit_id, namespace)
            if e.status == EditStatus.pending:  # (the store refuses any other status itself)
                matches = self.matches([e.model_copy(update={"status": EditStatus.active})]).get(e.id, [])
        out = self.store.review(edit_id, approve, namespace, matches=matches, on_conflict=on_conflict)
        self.sync()
        return out

    def _add_batched(self, edits: list[Edit], progress: bool, batch_size: int, on_conflict: str) -> list[Edit]:
        from concurrent.futures import ThreadPoolExecutor

        batches = [edits[i:i + batch_size] for i in range(0, len(edits), batch_size)]
        stored: list[Edit] = []
        with ThreadPoolExecutor(1, thread_name_prefix="kem-import") as pool, \
                tqdm(total=len(edits), desc="importing", unit="edit", disable=not progress) as bar:
            pending = pool.submit(self.embed_edits, batches[0])
            try:
                for k, batch in enumerate(batches):
                    vecs = pending.result()
                    if k + 1 < len(batches):  # embed the next batch while this one is written
                        pending = pool.submit(self.embed_edits, batches[k + 1])
                    stored += self._store(batch, vecs, on_conflict)
                    bar.update(len(batch))
            except BaseException as exc:
                pending.cancel()
                exc.add_note(f"{len(stored)} edits in {len(stored) // batch_size} earlier batches of "
                             f"{batch_size} were stored; the failing batch and later ones were not")
                raise
            finally:
                self.sync()
        return stored

    def search(self, query: str, namespace: str, k: int, query_vec: np.ndarray | None = None,
               exclude_versions: frozenset[str] = frozenset(), as_of: datetime | None = None,
               ) -> list[tuple[Edit, float]]:
        """Top ``k`` edits of ``namespace`` for ``query`` that apply at ``as_of`` (default: now; inside
        their validity window, superseded ones only before their successor took over), as ``(edit, cosine)``."""
        self.sync()
        if query_vec is None:
            query_vec = self.embedder.embed([query])[0]
        when = as_of or utcnow()
        fetch = k * OVERFETCH  # superseded, scheduled and expired edits are filtered out after the search
        out: list[tuple[Edit, float]] = []
        for edit_id, score in self.index.search(namespace, query_vec, fetch)[0]:
            try:
                e = self.store.get(edit_id, namespace)
            except KeyError:
                continue  # deleted between sync and now
            if e.applies_at(when) and not (e.consolidated_in and e.consolidated_in in exclude_versions):
                out.append((e, min(1.0, max(-1.0, float(score)))))  # cosine, float error clipped
                if len(out) == k:
                    break
        return out


def _add_grouped(index: NamespacedIndex, edits: Sequence[Edit], vectors: Sequence[np.ndarray]) -> None:
    """Index edits with one FAISS call per namespace."""
    groups: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for e, v in zip(edits, vectors, strict=True):
        ids, vs = groups.setdefault(e.namespace, ([], []))
        ids.append(e.id)
        vs.append(v)
    for ns, (ids, vs) in groups.items():
        index.add_many(ns, ids, vs)
