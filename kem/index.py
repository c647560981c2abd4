"""The FAISS vector index over edit embeddings: derived state, one partition per namespace.

Each namespace has its own FAISS index, so a search in namespace A cannot return an edit of
namespace B. An edit contributes one vector per retrieval key (rendered prompt, fact, paraphrases); a
search returns edits ranked by their best key (max over keys).

Small partitions use exact inner-product search (``IndexFlatIP``). A partition that grows past
``ann_threshold`` vectors switches to an inverted-file index (``IndexIVFFlat``: spherical k-means
coarse quantizer with ``nlist ≈ 4·sqrt(n)`` lists, ``nprobe`` lists visited per query), retrained
with more lists each time it has grown ``RETRAIN_GROWTH``-fold since its last training, and turned
back into a flat index when it shrinks below half the threshold. IVF was chosen over HNSW by
measurement (docs/retrieval.md): on real edit embeddings its recall is on a par with HNSW's, it
builds 2M vectors in minutes instead of a quarter of an hour, and it removes vectors for real (no
tombstones), through a hash-table direct map; HNSW answers single queries faster at equal recall.

The index is saved beside the store with the store revision it reflects; ``EditMemory`` rebuilds it
from the store's saved embeddings when it is missing, corrupt or stale.

Thread safety: FAISS releases the GIL, and a search running while another thread adds to or
removes from the same FAISS index can crash the process. Each partition therefore has a
readers-writer lock: searches (and saves) share it, so they run in parallel with each other;
adds and removes take it alone. Writers of one partition also take its ``writer`` mutex, one at a
time; a rebuild (IVF training, which can take minutes) holds only that mutex while it builds the new
FAISS index aside, so searches go on against the old one until the swap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KEY_BITS = 6  # up to 64 retrieval keys per edit
INDEX_FORMAT = 2  # 1: flat/HNSW with tombstones (rebuilt from the store on load)

FLAT, IVF = "flat", "ivf"
DEFAULT_ANN_THRESHOLD = 20_000  # vectors in one namespace above which it leaves exact search
DEFAULT_NPROBE = 64  # inverted lists visited per query
NLIST_FACTOR = 4.0  # nlist = NLIST_FACTOR * sqrt(vectors at training time)
MIN_NLIST, MAX_NLIST = 64, 65_536
RETRAIN_GROWTH = 4  # retrain the coarse quantizer once the partition is this many times larger
TRAIN_POINTS_PER_LIST = 32  # k-means sample size per list (faiss subsamples above this)
TRAIN_ITERATIONS = 10
TRAIN_SEED = 1234
SINGLE_THREAD_QUERIES = 4  # searches of at most this many queries run on one thread (docs/retrieval.md)


def _faiss() -> Any:
    import faiss

    return faiss


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run FAISS with at most ``n`` OpenMP threads in this thread (OpenMP's setting is per thread)."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    if before <= n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class RWLock:
    """A readers-writer lock: any number of readers together, or one writer alone.

    Writers are preferred: once a writer waits, new readers wait behind it, so a steady stream of
    searches cannot starve an edit. Not reentrant: a thread must not take it again while holding it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def ivf_nlist(n: int, factor: float = NLIST_FACTOR) -> int:
    """Number of inverted lists for a partition of ``n`` vectors."""
    return int(min(MAX_NLIST, max(MIN_NLIST, round(factor * math.sqrt(max(n, 1))))))


def _id_range(slot: int, n: int) -> np.ndarray:
    return (np.int64(slot) << KEY_BITS) + np.arange(n, dtype=np.int64)


@dataclass
class _Partition:
    """One namespace's vectors. FAISS ids are ``(slot << KEY_BITS) | key_number``.

    ``trained_on`` is the number of vectors the IVF quantizer was trained on (0 for flat).

    Locking (see the module docstring) is the caller's: :meth:`search` and :meth:`all_vectors` under
    ``rw.read()``; :meth:`add` and :meth:`remove` under ``writer`` and ``rw.write()``; :meth:`rebuild`
    under ``writer`` only (it takes ``rw.write()`` itself for the swap).
    """

    dim: int
    kind: str = FLAT
    nprobe: int = DEFAULT_NPROBE
    index: Any = None
    slot_of: dict[str, int] = field(default_factory=dict)
    edit_of: dict[int, str] = field(default_factory=dict)
    keys_of: dict[int, int] = field(default_factory=dict)  # slot -> number of vectors
    next_slot: int = 0
    trained_on: int = 0
    rw: RWLock = field(default_factory=RWLock, repr=False, compare=False)
    writer: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = self._new_flat()

    # ---- construction ---------------------------------------------------------------------------
    def _new_flat(self) -> Any:
        faiss = _faiss()
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_ivf(self, train: np.ndarray, nlist: int) -> Any:
        """A trained, empty ``IndexIVFFlat`` (inner product, spherical k-means, hash-table direct map)."""
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()  # owned by ivf from now on
        ivf.cp.spherical = True
        ivf.cp.niter = TRAIN_ITERATIONS
        ivf.cp.seed = TRAIN_SEED
        ivf.cp.min_points_per_centroid = 1
        ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        ivf.train(np.ascontiguousarray(train, dtype=np.float32))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        ivf.nprobe = min(self.nprobe, nlist)
        return ivf

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # ---- writes ---------------------------------------------------------------------------------
    def add(self, edit_ids: Sequence[str], vecs: Sequence[np.ndarray]) -> None:
        """Index ``edit_ids[i]`` with key vectors ``vecs[i]`` (shape ``(n_keys, dim)``), replacing old ones.

        An id given twice keeps its last vectors.
        """
        latest = dict(zip(edit_ids, vecs, strict=True))
        for edit_id in latest:
            if edit_id in self.slot_of:
                self.remove(edit_id)
        ids, rows = [], []
        for edit_id, v in latest.items():
            v = v[: 1 << KEY_BITS]
            slot = self.next_slot
            self.next_slot += 1
            self.slot_of[edit_id] = slot
            self.edit_of[slot] = edit_id
            self.keys_of[slot] = len(v)
            ids.append(_id_range(slot, len(v)))
            rows.append(v)
        if rows:
            x = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
            self.index.add_with_ids(x, np.ascontiguousarray(np.concatenate(ids)))

    def remove(self, edit_id: str) -> bool:
        slot = self.slot_of.pop(edit_id, None)
        if slot is None:
            return False
        del self.edit_of[slot]
        n = self.keys_of.pop(slot)
        faiss = _faiss()
        if self.kind == FLAT:
            self.index.remove_ids(faiss.IDSelectorRange(int(slot) << KEY_BITS, (int(slot) << KEY_BITS) + n))
        else:  # the hash-table direct map only takes explicit id arrays
            ids = _id_range(slot, n)
            self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
        return True

    # ---- rebuilds -------------------------------------------------------------------------------
    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector and its FAISS id: ``(n, dim)`` float32 and ``(n,)`` int64 (copies)."""
        faiss = _faiss()
        n, d = self.ntotal, self.dim
        if n == 0:
            return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
        if self.kind == FLAT:
            flat = faiss.downcast_index(self.index.index)
            x = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d).copy()
            return x, faiss.vector_to_array(self.index.id_map).astype(np.int64)
        invlists = self.index.invlists
        xs, ids = [], []
        for lst in range(self.index.nlist):
            size = invlists.list_size(lst)
            if size:
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size)
                xs.append(codes.view(np.float32).reshape(size, d).copy())
        return np.concatenate(xs), np.concatenate(ids).astype(np.int64)

    def rebuild(self, kind: str, nlist_factor: float = NLIST_FACTOR) -> None:
        """Rebuild as ``kind`` from the stored vectors (an IVF is retrained on its current content).

        The new FAISS index is built aside while searches keep using the current one (the caller
        holds ``writer``, so nothing changes it meanwhile), then swapped in under ``rw.write()``.
        """
        x, ids = self.all_vectors()  # a read: safe beside searches
        if kind == IVF:
            nlist = ivf_nlist(len(x), nlist_factor)
            log.info("training an IVF index: %d vectors, %d lists", len(x), nlist)
            index, trained_on = self._new_ivf(x, nlist), len(x)
        else:
            index, trained_on = self._new_flat(), 0
        if len(x):
            index.add_with_ids(x, ids)
        with self.rw.write():
            self.index, self.kind, self.trained_on = index, kind, trained_on

    # ---- reads ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Best ``k`` edits per query row, by the max inner product over each edit's keys."""
        out: list[list[tuple[str, float]]] = []
        if self.ntotal == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        fetch = min(self.ntotal, 4 * k + 8)
        todo = list(range(len(queries)))
        results: dict[int, list[tuple[str, float]]] = {}
        while todo:
            # one query gains nothing from threads and loses to their wake-up on a busy machine
            with _omp_threads(1 if len(todo) <= SINGLE_THREAD_QUERIES else 1 << 16):
                scores, ids = self.index.search(np.ascontiguousarray(queries[todo], dtype=np.float32), fetch)
            again = []
            for q, srow, irow in zip(todo, scores, ids, strict=True):
                best: dict[str, float] = {}
                for s, i in zip(srow.tolist(), irow.tolist(), strict=True):
                    if i < 0:
                        break
                    edit_id = self.edit_of.get(i >> KEY_BITS)
                    if edit_id is not None and edit_id not in best:
                        best[edit_id] = s  # results come sorted: the first hit is the edit's best key
                        if len(best) == k:
                            break
                results[q] = list(best.items())
                # fewer than k distinct edits in a full page: some edits filled it with several keys
                if len(best) < k and fetch < self.ntotal and irow[-1] >= 0:
                    again.append(q)
            todo, fetch = again, min(self.ntotal, fetch * 4)
        out = [results[q] for q in range(len(queries))]
        return out


class NamespacedIndex:
    """One FAISS partition per namespace, with string edit ids.

    Args:
        dim: Embedding dimension.
        ann_threshold: Vectors in one namespace above which it switches from exact (flat) search to
            an IVF index. ``None``: :data:`DEFAULT_ANN_THRESHOLD`.
        nprobe: Inverted lists an IVF partition visits per query (recall/latency trade-off).
        nlist_factor: IVF partitions get ``nlist_factor * sqrt(n)`` lists when (re)trained.
    """

    def __init__(self, dim: int, ann_threshold: int | None = DEFAULT_ANN_THRESHOLD, *,
                 nprobe: int = DEFAULT_NPROBE, nlist_factor: float = NLIST_FACTOR) -> None:
        self.dim = dim
        self.ann_threshold = DEFAULT_ANN_THRESHOLD if ann_threshold is None else int(ann_threshold)
        if self.ann_threshold < 1:
            raise ValueError(f"ann_threshold must be >= 1 (got {ann_threshold})")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1 (got {nprobe})")
        self.nprobe = nprobe
        self.nlist_factor = nlist_factor
        self._parts: dict[str, _Partition] = {}
        self._parts_lock = threading.Lock()  # guards the dict itself (partitions lock themselves)
        self.revision = 0

    def _partitions(self) -> list[tuple[str, _Partition]]:
        with self._parts_lock:
            return list(self._parts.items())

    def _partition(self, namespace: str, create: bool = False) -> _Partition | None:
        with self._parts_lock:
            part = self._parts.get(namespace)
            if part is None and create:
                part = self._parts[namespace] = _Partition(self.dim, nprobe=self.nprobe)
            return part

    def __len__(self) -> int:
        total = 0
        for _, p in self._partitions():
            with p.rw.read():
                total += len(p.slot_of)
        return total

    def namespaces(self) -> list[str]:
        return sorted(ns for ns, _ in self._partitions())

    def contains(self, namespace: str, edit_id: str) -> bool:
        p = self._partition(namespace)
        if p is None:
            return False
        with p.rw.read():
            return edit_id in p.slot_of

    def kind(self, namespace: str) -> str | None:
        """``"flat"`` or ``"ivf"``: the index type of ``namespace``'s partition (``None``: no partition)."""
        p = self._partition(namespace)
        return None if p is None else p.kind

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        return vectors

    def add(self, namespace: str, edit_id: str, vectors: np.ndarray) -> None:
        """Index (or re-index) ``edit_id`` with its key vectors, shape ``(n_keys, dim)``."""
        self.add_many(namespace, [edit_id], [vectors])

    def add_many(self, namespace: str, edit_ids: Sequence[str], vectors: Sequence[np.ndarray]) -> None:
        """Index (or re-index) several edits of one namespace at once (one FAISS call: much faster).

        Args:
            namespace: The namespace of every edit.
            edit_ids: Edit ids.
            vectors: One ``(n_keys, dim)`` array per edit.
        """
        if len(edit_ids) != len(vectors):
            raise ValueError(f"edit_ids and vectors differ in length ({len(edit_ids)} vs {len(vectors)})")
        vecs = [self._check(v) for v in vectors]
        part = self._partition(namespace, create=True)
        assert part is not None
        with part.writer:
            with part.rw.write():
                part.add(list(edit_ids), vecs)
            self._maybe_rebuild(namespace, part)

    def _maybe_rebuild(self, namespace: str, part: _Partition) -> None:
        """Switch ``part`` between flat and IVF, or retrain it, as its size asks (caller holds ``part.writer``)."""
        n = part.ntotal
        if part.kind == FLAT and n > self.ann_threshold:
            log.info("namespace %r passed %d vectors: switching to IVF", namespace, self.ann_threshold)
            part.rebuild(IVF, self.nlist_factor)
        elif part.kind == IVF and n > RETRAIN_GROWTH * part.trained_on:
            log.info("namespace %r grew to %d vectors: retraining its IVF index", namespace, n)
            part.rebuild(IVF, self.nlist_factor)
        elif part.kind == IVF and n < self.ann_threshold // 2:
            log.info("namespace %r shrank to %d vectors: back to exact search", namespace, n)
            part.rebuild(FLAT)

    def remove(self, namespace: str, edit_id: str) -> bool:
        part = self._partition(namespace)
        if part is None:
            return False
        with part.writer:
            with part.rw.write():
                if not part.remove(edit_id):
                    return False
            self._maybe_rebuild(namespace, part)
        return True

    def search(self, namespace: str, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top ``k`` ``(edit_id, score)`` per query row, within ``namespace`` only."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        part = self._partition(namespace)
        if part is None:
            return [[] for _ in range(len(queries))]
        with part.rw.read():
            return part.search(queries, k)

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, folder: str | Path, meta: dict[str, Any]) -> None:
        """Write every partition and a ``meta.json`` (with ``revision``) atomically into ``folder``.

        Each partition is written as one consistent snapshot (under its read lock, beside searches);
        a caller that needs every partition and ``revision`` from one moment serialises its writers
        around this call, as :class:`~kem.memory.EditMemory` does.
        """
        faiss = _faiss()
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".index.", dir=folder.parent))
        try:
            parts = {}
            for ns, p in self._partitions():
                fname = hashlib.sha1(ns.encode()).hexdigest()[:16]
                with p.rw.read():
                    faiss.write_index(p.index, str(tmp / f"{fname}.faiss"))
                    slots = sorted(p.edit_of)
                    table = np.array([[s, p.keys_of[s]] for s in slots], dtype=np.int64)
                    names = [p.edit_of[s] for s in slots]
                    parts[ns] = {"file": fname, "kind": p.kind, "next_slot": p.next_slot,
                                 "trained_on": p.trained_on, "nprobe": p.nprobe}
                np.save(tmp / f"{fname}.slots.npy", table)
                (tmp / f"{fname}.ids.json").write_text(json.dumps(names))
            info = {**meta, "format": INDEX_FORMAT, "dim": self.dim, "revision": self.revision, "partitions": parts}
            (tmp / "meta.json").write_text(json.dumps(info, indent=1))
            old = folder.with_name(folder.name + ".old")
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str | Path, ann_threshold: int | None = DEFAULT_ANN_THRESHOLD, *,
             nprobe: int = DEFAULT_NPROBE, nlist_factor: float = NLIST_FACTOR) -> tuple[NamespacedIndex, dict[str, Any]]:
        """Load an index saved by :meth:`save`. Raises on any missing, corrupt or older-format file."""
        faiss = _faiss()
        folder = Path(folder)
        info = json.loads((folder / "meta.json").read_text())
        if info.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {info.get('format')} is not {INDEX_FORMAT}")
        idx = cls(int(info["dim"]), ann_threshold, nprobe=nprobe, nlist_factor=nlist_factor)
        idx.revision = int(info["revision"])
        for ns, p in info["partitions"].items():
            if p["kind"] not in (FLAT, IVF):
                raise ValueError(f"index partition {ns!r} has unknown kind {p['kind']!r}")
            index = faiss.read_index(str(folder / f"{p['file']}.faiss"))
            part = _Partition(idx.dim, kind=p["kind"], nprobe=nprobe, index=index)
            if part.kind == IVF:
                part.index.nprobe = min(nprobe, part.index.nlist)
            slots = np.load(folder / f"{p['file']}.slots.npy").reshape(-1, 2)
            ids = json.loads((folder / f"{p['file']}.ids.json").read_text())
            if len(ids) != len(slots) or int(slots[:, 1].sum()) != part.ntotal:
                raise ValueError(f"index partition {ns!r} is inconsistent")
            for (slot, n), edit_id in zip(slots.tolist(), ids, strict=True):
                part.slot_of[edit_id] = slot
                part.edit_of[slot] = edit_id
                part.keys_of[slot] = n
            part.next_slot, part.trained_on = int(p["next_slot"]), int(p["trained_on"])
            idx._parts[ns] = part
        return idx, info
