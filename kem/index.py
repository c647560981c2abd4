"""The FAISS vector index over edit embeddings: derived state, one partition per namespace.

Each namespace has its own FAISS index, so a search in namespace A cannot return an edit of
namespace B. An edit contributes one vector per retrieval key (rendered prompt, fact, paraphrases); a
search returns edits ranked by their best key (max over keys).

The index type follows the partition's size, with hysteresis: exact inner-product search
(``IndexFlatIP``) up to ``ann_threshold`` vectors; past it an approximate index, built in a
background thread while the flat index keeps answering; back to exact search (at once) when the
partition shrinks below half the threshold. The approximate kind (``ann_kind``) is chosen by
measurement (docs/retrieval.md):

- ``"hnsw"`` (default): an ``IndexHNSWFlat`` graph (M=32) over full vectors behind an
  ``IndexIDMap2``, up to ``hnsw_max`` vectors (IVF above it, back to HNSW below half of it: on
  near-duplicate-heavy data HNSW's recall fell at 2M vectors). One query visits a few thousand
  vectors whatever the partition's size (0.5 ms at 200k vectors vs 6 ms for IVF, same run; 1.1 ms
  at 1M with efSearch raised to ``LARGE_EF_SEARCH`` past ``HNSW_LARGE_VECTORS``).
  HNSW cannot delete: a removed edit's vectors stay in the graph as *tombstones* (their slot is no
  longer in the id tables, so a search skips them and over-fetches to make up for them), and once
  tombstones pass ``DEAD_FRACTION`` of the graph it is rebuilt from the live vectors in the
  background.
- ``"ivf"``: an ``IndexIVFFlat`` (spherical k-means coarse quantizer with ``nlist ≈ 4·sqrt(n)``
  lists, ``nprobe`` lists visited per query) with real deletions through a hash-table direct map,
  retrained in the background each time the partition has grown ``RETRAIN_GROWTH``-fold. kem's
  index before HNSW; used above ``hnsw_max`` and everywhere with ``ann_kind="ivf"``.

The index is saved beside the store with the store revision it reflects; ``EditMemory`` rebuilds it
from the store's saved embeddings when it is missing, corrupt or stale.

Thread safety: FAISS releases the GIL, and a search running while another thread adds to or
removes from the same FAISS index can crash the process. Each partition therefore has a
readers-writer lock: searches (and saves) share it, so they run in parallel with each other;
adds and removes take it alone (big batches in slices, so searches are not stalled for long).
Writers of one partition also take its ``writer`` mutex, one at a time. A rebuild snapshots the live
vectors under ``writer``, builds the new FAISS index in a background thread holding no lock (searches
and writes go on against the old index), then takes ``writer``, brings the new index up to date
(edits added since the snapshot are copied over from the old index, edits removed since are removed
or tombstoned) and swaps it in under ``rw.write()``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KEY_BITS = 6  # up to 64 retrieval keys per edit
INDEX_FORMAT = 2  # 1: flat/HNSW with tombstones and no slot tables (rebuilt from the store on load)

FLAT, IVF, HNSW = "flat", "ivf", "hnsw"
ANN_KINDS = (HNSW, IVF)
DEFAULT_ANN_KIND = HNSW
DEFAULT_ANN_THRESHOLD = 20_000  # vectors in one namespace above which it leaves exact search
# HNSW (docs/retrieval.md): M graph neighbours per vector, efConstruction when adding, efSearch per query
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 100
DEFAULT_EF_SEARCH = 128
DEAD_FRACTION = 0.2  # tombstoned share of an HNSW graph that triggers a background rebuild
# Above this many vectors an "hnsw" index uses IVF instead (back to HNSW below half of it). Measured
# (docs/retrieval.md): on 1M vectors of real keys plus samples of a mixture fitted to them, HNSW
# (efSearch 256) reached recall@4 0.961 at 1.1 ms, IVF over an HNSW quantizer 0.923 at 2.4 ms. On the
# old tiled data (clouds of near-duplicates, 2M vectors) HNSW's recall fell to 0.77-0.90, so the cap
# stays at the largest size measured on realistic data.
HNSW_MAX_VECTORS = 1_000_000
# Above this many vectors an HNSW partition searches with at least LARGE_EF_SEARCH candidates: at 1M
# realistic vectors efSearch 128 gave recall@4 0.949, 256 gave 0.961 (docs/retrieval.md).
HNSW_LARGE_VECTORS = 250_000
LARGE_EF_SEARCH = 256
# ... and links vectors added from then on with LARGE_EF_CONSTRUCTION: at 1M, efConstruction 200 vs 100
# raised recall@4 at efSearch 256 from 0.961 to 0.979 (real paraphrase queries 0.923 -> 0.958) for
# 2.2x the build time (docs/retrieval.md).
LARGE_EF_CONSTRUCTION = 200


def ef_construction_for(n: int) -> int:
    """efConstruction for an HNSW graph of ``n`` vectors (larger past ``HNSW_LARGE_VECTORS``)."""
    return LARGE_EF_CONSTRUCTION if n > HNSW_LARGE_VECTORS else HNSW_EF_CONSTRUCTION


# IVF
DEFAULT_NPROBE = 64  # inverted lists visited per query
NLIST_FACTOR = 4.0  # nlist = NLIST_FACTOR * sqrt(vectors at training time)
MIN_NLIST, MAX_NLIST = 64, 65_536
RETRAIN_GROWTH = 4  # retrain the coarse quantizer once the partition is this many times larger
TRAIN_POINTS_PER_LIST = 32  # k-means sample size per list (faiss subsamples above this)
TRAIN_ITERATIONS = 10
TRAIN_SEED = 1234
SINGLE_THREAD_QUERIES = 4  # searches of at most this many queries run on one thread (docs/retrieval.md)
WRITE_SLICE = 4096  # vectors added to an approximate index per hold of the write lock
BUILD_BATCH = 16_384  # vectors per FAISS add call while building (progress logged, exit checked between them)


_EXITING = threading.Event()  # set at interpreter exit: background builds stop between batches
_BUILDERS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _stop_builds() -> None:
    _EXITING.set()
    for t in list(_BUILDERS):
        t.join(60)


class _Cancelled(Exception):
    """A background build stopped because the interpreter is exiting."""


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

    A slot is never reused, so the FAISS ids of a removed edit (HNSW tombstones: ``dead`` of the
    FAISS index's vectors) can never be mistaken for another edit's. ``trained_on`` is the number of
    vectors an IVF quantizer was trained on (0 otherwise).

    Locking (see the module docstring) is the caller's: :meth:`search` and :meth:`all_vectors` under
    ``rw.read()``; :meth:`add` and :meth:`remove` under ``writer`` and ``rw.write()``; :meth:`rebuild`
    and :meth:`start_rebuild` under ``writer`` only (they take ``rw.write()`` themselves for the swap).
    """

    dim: int
    kind: str = FLAT
    nprobe: int = DEFAULT_NPROBE
    ef_search: int = DEFAULT_EF_SEARCH
    hnsw_m: int = HNSW_M
    index: Any = None
    slot_of: dict[str, int] = field(default_factory=dict)
    edit_of: dict[int, str] = field(default_factory=dict)
    keys_of: dict[int, int] = field(default_factory=dict)  # slot -> number of vectors
    next_slot: int = 0
    trained_on: int = 0
    dead: int = 0  # tombstoned vectors still inside an HNSW index
    rw: RWLock = field(default_factory=RWLock, repr=False, compare=False)
    writer: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    building: threading.Thread | None = field(default=None, repr=False, compare=False)
    building_kind: str | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = self._build(FLAT, np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64))

    # ---- construction ---------------------------------------------------------------------------
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

    def _new_hnsw(self, n: int) -> Any:
        """An empty HNSW index for ``n`` vectors (efConstruction by size, as :meth:`apply_params` sets it)."""
        faiss = _faiss()
        hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction_for(n)
        hnsw.hnsw.efSearch = self.ef_search
        index = faiss.IndexIDMap2(hnsw)
        index.own_fields = True
        hnsw.this.disown()
        return index

    def _build(self, kind: str, x: np.ndarray, ids: np.ndarray, nlist_factor: float = NLIST_FACTOR) -> Any:
        """A new FAISS index of ``kind`` holding ``x`` (``(n, dim)`` float32) under ``ids``."""
        faiss = _faiss()
        if kind == FLAT:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        elif kind == IVF:
            nlist = ivf_nlist(len(x), nlist_factor)
            log.info("training an IVF index: %d vectors, %d lists", len(x), nlist)
            index = self._new_ivf(x, nlist)
        elif kind == HNSW:
            index = self._new_hnsw(len(x))
        else:
            raise ValueError(f"index kind must be one of {(FLAT, *ANN_KINDS)} (got {kind!r})")
        for lo in range(0, len(x), BUILD_BATCH):
            if _EXITING.is_set() and threading.current_thread() in _BUILDERS:
                raise _Cancelled
            index.add_with_ids(x[lo:lo + BUILD_BATCH], ids[lo:lo + BUILD_BATCH])
            if kind != FLAT and len(x) > BUILD_BATCH:
                log.info("building a %s index: %d / %d vectors", kind, min(len(x), lo + BUILD_BATCH), len(x))
        return index

    def apply_params(self) -> None:
        """Set the search-time knobs (``nprobe``, ``efSearch``) on the current FAISS index."""
        if self.kind == IVF:
            self.index.nprobe = min(self.nprobe, self.index.nlist)
        elif self.kind == HNSW:
            hnsw = _faiss().downcast_index(self.index.index).hnsw
            hnsw.efSearch = self.effective_ef()
            hnsw.efConstruction = ef_construction_for(self.ntotal)

    def effective_ef(self) -> int:
        """efSearch for this partition's size: ``ef_search``, at least ``LARGE_EF_SEARCH`` past ``HNSW_LARGE_VECTORS``
        (where vectors are also linked with ``LARGE_EF_CONSTRUCTION``)."""
        return max(self.ef_search, LARGE_EF_SEARCH) if self.ntotal > HNSW_LARGE_VECTORS else self.ef_search

    def describe(self) -> str:
        if self.kind == IVF:
            return f"ivf nlist={self.index.nlist} nprobe={self.index.nprobe}"
        if self.kind == HNSW:
            return f"hnsw M={self.hnsw_m} efSearch={self.effective_ef()} tombstones={self.dead}"
        return FLAT

    @property
    def ntotal(self) -> int:
        """Live vectors (an HNSW index also holds ``dead`` tombstoned ones)."""
        return int(self.index.ntotal) - self.dead

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
            id_arr = np.ascontiguousarray(np.concatenate(ids))
            self.index.add_with_ids(x, id_arr)

    def _drop(self, index: Any, kind: str, slot: int, n: int) -> int:
        """Remove slot ``slot``'s ``n`` vectors from ``index``; returns how many became tombstones."""
        faiss = _faiss()
        if kind == HNSW:  # no removal in a graph: the id tables no longer name the slot
            return n
        if kind == FLAT:
            index.remove_ids(faiss.IDSelectorRange(int(slot) << KEY_BITS, (int(slot) << KEY_BITS) + n))
        else:  # the hash-table direct map only takes explicit id arrays
            ids = _id_range(slot, n)
            index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
        return 0

    def remove(self, edit_id: str) -> bool:
        slot = self.slot_of.pop(edit_id, None)
        if slot is None:
            return False
        del self.edit_of[slot]
        n = self.keys_of.pop(slot)
        self.dead += self._drop(self.index, self.kind, slot, n)
        return True

    # ---- rebuilds -------------------------------------------------------------------------------
    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live vector and its FAISS id: ``(n, dim)`` float32 and ``(n,)`` int64 (copies)."""
        faiss = _faiss()
        n, d = int(self.index.ntotal), self.dim
        if n == 0:
            return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
        if self.kind == IVF:
            invlists = self.index.invlists
            xs, idl = [], []
            for lst in range(self.index.nlist):
                size = invlists.list_size(lst)
                if size:
                    idl.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
                    codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size)
                    xs.append(codes.view(np.float32).reshape(size, d).copy())
            return np.concatenate(xs), np.concatenate(idl).astype(np.int64)
        inner = faiss.downcast_index(self.index.index)
        flat = inner if self.kind == FLAT else faiss.downcast_index(inner.storage)
        x = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if not self.dead:
            return x.copy(), ids
        live = np.isin(ids >> KEY_BITS, np.fromiter(self.edit_of, np.int64, len(self.edit_of)))
        return x[live], ids[live]  # boolean indexing copies

    def rebuild(self, kind: str, nlist_factor: float = NLIST_FACTOR) -> None:
        """Rebuild as ``kind`` from the live vectors, here and now (builds aside, then swaps)."""
        x, ids = self.all_vectors()  # a read: safe beside searches
        index = self._build(kind, x, ids, nlist_factor)
        with self.rw.write():
            self.index, self.kind, self.dead = index, kind, 0
            self.trained_on = len(x) if kind == IVF else 0
            self.apply_params()

    def start_rebuild(self, kind: str, nlist_factor: float, done: Callable[[], None]) -> bool:
        """Rebuild as ``kind`` in a background thread; ``done()`` runs after the swap, holding ``writer``.

        Returns False (and does nothing) when a rebuild is already running.
        """
        if self.building is not None:
            return False
        x, ids = self.all_vectors()
        self.building_kind = kind
        self.building = threading.Thread(target=self._build_and_swap,
                                         args=(kind, x, ids, self.next_slot, nlist_factor, done),
                                         name=f"kem-index-{kind}-build", daemon=True)
        _BUILDERS.add(self.building)
        self.building.start()
        return True

    def _build_and_swap(self, kind: str, x: np.ndarray, ids: np.ndarray, first_new_slot: int, nlist_factor: float,
                        done: Callable[[], None]) -> None:
        try:
            index = self._build(kind, x, ids, nlist_factor)
        except Exception as exc:
            if not isinstance(exc, _Cancelled):
                log.exception("building a %s index of %d vectors failed; keeping the %s index", kind, len(x),
                              self.kind)
            with self.writer:
                self.building, self.building_kind = None, None
            return
        trained_on = len(x) if kind == IVF else 0
        del x
        with self.writer:
            dead = self._catch_up(index, kind, ids, first_new_slot)
            with self.rw.write():
                self.index, self.kind, self.dead, self.trained_on = index, kind, dead, trained_on
                self.apply_params()
            self.building, self.building_kind = None, None
            log.info("index partition is now %s (%d vectors)", self.describe(), self.ntotal)
            done()

    def _catch_up(self, index: Any, kind: str, snapshot_ids: np.ndarray, first_new_slot: int) -> int:
        """Bring ``index`` (built from ``snapshot_ids``) up to the writes made since; returns its tombstones.

        Edits added since have slots from ``first_new_slot`` on; their vectors are copied from the
        current index. Snapshot vectors whose slot is gone were removed since.
        """
        live = np.fromiter(self.edit_of, np.int64, len(self.edit_of))
        new = np.sort(live[live >= first_new_slot])
        for lo in range(0, len(new), BUILD_BATCH // 4):
            ids = np.concatenate([_id_range(int(s), self.keys_of[int(s)]) for s in new[lo:lo + BUILD_BATCH // 4]])
            index.add_with_ids(self.index.reconstruct_batch(ids), ids)
        gone = snapshot_ids[~np.isin(snapshot_ids >> KEY_BITS, live)]
        if kind == HNSW or not len(gone):
            return len(gone)
        faiss = _faiss()  # a hash-set selector for the id map; IVF's hash-table direct map takes an array
        sel = faiss.IDSelectorBatch if kind == FLAT else faiss.IDSelectorArray
        index.remove_ids(sel(len(gone), faiss.swig_ptr(gone)))
        return 0

    # ---- reads ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Best ``k`` edits per query row, by the max inner product over each edit's keys.

        Hits on tombstones and on further keys of an edit already found are skipped; a query whose
        page held fewer than ``k`` distinct live edits is asked again for a page four times larger.
        """
        raw = int(self.index.ntotal)
        if self.ntotal == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        fetch = min(raw, 4 * k + 8)
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
                        continue  # HNSW may pad a page with -1 before its end
                    edit_id = self.edit_of.get(i >> KEY_BITS)
                    if edit_id is not None and edit_id not in best:
                        best[edit_id] = s  # results come sorted: the first hit is the edit's best key
                        if len(best) == k:
                            break
                results[q] = list(best.items())
                # fewer than k distinct live edits in a full page: keys or tombstones filled it
                if len(best) < k and fetch < raw and (self.kind == HNSW or irow[-1] >= 0):
                    again.append(q)
            todo, fetch = again, min(raw, fetch * 4)
        return [results[q] for q in range(len(queries))]


class NamespacedIndex:
    """One FAISS partition per namespace, with string edit ids.

    Args:
        dim: Embedding dimension.
        ann_threshold: Vectors in one namespace above which it leaves exact (flat) search for the
            approximate ``ann_kind`` (and below half of which it comes back). ``None``:
            :data:`DEFAULT_ANN_THRESHOLD`.
        ann_kind: ``"hnsw"`` (default) or ``"ivf"``; see the module docstring.
        nprobe: Inverted lists an IVF partition visits per query (recall/latency trade-off).
        nlist_factor: IVF partitions get ``nlist_factor * sqrt(n)`` lists when (re)trained.
        ef_search: Candidates an HNSW search keeps (recall/latency trade-off).
        hnsw_m: Graph neighbours per vector of an HNSW partition built from now on.
        hnsw_max: With ``ann_kind="hnsw"``, partitions above this many vectors use IVF (and go back
            to HNSW below half of it). ``None``: no cap.
    """

    def __init__(self, dim: int, ann_threshold: int | None = DEFAULT_ANN_THRESHOLD, *,
                 ann_kind: str = DEFAULT_ANN_KIND, nprobe: int = DEFAULT_NPROBE,
                 nlist_factor: float = NLIST_FACTOR, ef_search: int = DEFAULT_EF_SEARCH,
                 hnsw_m: int = HNSW_M, hnsw_max: int | None = HNSW_MAX_VECTORS) -> None:
        self.dim = dim
        self.ann_threshold = DEFAULT_ANN_THRESHOLD if ann_threshold is None else int(ann_threshold)
        if self.ann_threshold < 1:
            raise ValueError(f"ann_threshold must be >= 1 (got {ann_threshold})")
        if ann_kind not in ANN_KINDS:
            raise ValueError(f"ann_kind must be one of {ANN_KINDS} (got {ann_kind!r})")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1 (got {nprobe})")
        if ef_search < 1:
            raise ValueError(f"ef_search must be >= 1 (got {ef_search})")
        if hnsw_m < 2:
            raise ValueError(f"hnsw_m must be >= 2 (got {hnsw_m})")
        self.ann_kind = ann_kind
        self.nprobe = nprobe
        self.nlist_factor = nlist_factor
        self.ef_search = ef_search
        self.hnsw_m = hnsw_m
        self.hnsw_max = hnsw_max
        self._parts: dict[str, _Partition] = {}
        self._parts_lock = threading.Lock()  # guards the dict itself (partitions lock themselves)
        self.revision = 0

    def _new_partition(self, **kw: Any) -> _Partition:
        return _Partition(self.dim, nprobe=self.nprobe, ef_search=self.ef_search, hnsw_m=self.hnsw_m, **kw)

    def _partitions(self) -> list[tuple[str, _Partition]]:
        with self._parts_lock:
            return list(self._parts.items())

    def _partition(self, namespace: str, create: bool = False) -> _Partition | None:
        with self._parts_lock:
            part = self._parts.get(namespace)
            if part is None and create:
                part = self._parts[namespace] = self._new_partition()
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
        """``"flat"``, ``"hnsw"`` or ``"ivf"``: the index type of ``namespace``'s partition (``None``: no partition)."""
        p = self._partition(namespace)
        return None if p is None else p.kind

    def describe(self, namespace: str) -> str | None:
        """The index type of ``namespace``'s partition with its parameters, e.g. ``"hnsw M=32 efSearch=128 tombstones=0"``."""
        p = self._partition(namespace)
        if p is None:
            return None
        with p.rw.read():
            return p.describe()

    def wait(self, namespace: str | None = None, timeout: float | None = None) -> bool:
        """Wait for background rebuilds (of ``namespace``, or of all); False if ``timeout`` ran out."""
        import time

        end = None if timeout is None else time.monotonic() + timeout
        while True:
            parts = [p for ns, p in self._partitions() if namespace is None or ns == namespace]
            busy = [t for t in (p.building for p in parts) if t is not None]
            if not busy:
                return True
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            busy[0].join(left)

    def maintain(self) -> None:
        """Start the rebuilds each partition's size and kind ask for (:meth:`load` calls it: a partition
        may have been saved while it was being rebuilt, or as another approximate kind)."""
        for ns, p in self._partitions():
            with p.writer:
                self._maybe_rebuild(ns, p)

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

        An approximate partition takes a big batch in slices of about ``WRITE_SLICE`` vectors, each
        under its own write lock, so concurrent searches wait for one slice at a time (and may see
        part of the batch). An id given twice keeps its last vectors.

        Args:
            namespace: The namespace of every edit.
            edit_ids: Edit ids.
            vectors: One ``(n_keys, dim)`` array per edit.
        """
        if len(edit_ids) != len(vectors):
            raise ValueError(f"edit_ids and vectors differ in length ({len(edit_ids)} vs {len(vectors)})")
        latest = dict(zip(edit_ids, (self._check(v) for v in vectors), strict=True))
        part = self._partition(namespace, create=True)
        assert part is not None
        ids, vecs = list(latest), list(latest.values())
        with part.writer:
            lo = 0
            while lo < len(ids):
                hi, n = lo, 0
                while hi < len(ids) and (part.kind == FLAT or n < WRITE_SLICE):
                    n += len(vecs[hi])
                    hi += 1
                with part.rw.write():
                    part.add(ids[lo:hi], vecs[lo:hi])
                lo = hi
            self._maybe_rebuild(namespace, part)

    def _maybe_rebuild(self, namespace: str, part: _Partition) -> None:
        """Switch ``part`` between flat and approximate, retrain or compact it, as its size asks.

        The caller holds ``part.writer``. Building an approximate index runs in the background (one
        at a time per partition; this check runs again after its swap); going back to flat is
        immediate (a copy of the live vectors), once no build is running.
        """
        graph = _faiss().downcast_index(part.index.index).hnsw if part.kind == HNSW else None
        if graph is not None and (graph.efSearch != part.effective_ef()
                                  or graph.efConstruction != ef_construction_for(part.ntotal)):
            with part.rw.write():  # the partition grew past (or shrank below) HNSW_LARGE_VECTORS
                part.apply_params()
        if part.building is not None:
            return  # the check runs again when that build is swapped in
        n = part.ntotal

        def start(target: str, why: str) -> None:
            log.info("namespace %r: %s (%d vectors): building a %s index in the background", namespace, why, n, target)
            part.start_rebuild(target, self.nlist_factor, lambda: self._maybe_rebuild(namespace, part))

        target = self.ann_kind  # HNSW up to hnsw_max, IVF above (back to HNSW below half of it)
        if target == HNSW and self.hnsw_max is not None and n > (self.hnsw_max // 2 if part.kind == IVF
                                                                  else self.hnsw_max):
            target = IVF
        if part.kind == FLAT and n > self.ann_threshold:
            start(target, f"passed {self.ann_threshold} vectors")
        elif part.kind != FLAT and n < self.ann_threshold // 2:
            log.info("namespace %r shrank to %d vectors: back to exact search", namespace, n)
            part.rebuild(FLAT)
        elif part.kind != FLAT and part.kind != target:
            start(target, f"holds a {part.kind} index")
        elif part.kind == IVF and n > RETRAIN_GROWTH * part.trained_on:
            start(IVF, f"grew {RETRAIN_GROWTH}x since its training")
        elif part.kind == HNSW and part.dead > DEAD_FRACTION * part.index.ntotal:
            start(HNSW, f"{part.dead} tombstones")

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

        Each partition is written as one consistent snapshot (under its read lock, beside searches;
        an HNSW partition with its tombstones, a partition being rebuilt as its current index);
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
                                 "trained_on": p.trained_on, "dead": p.dead}
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
    def load(cls, folder: str | Path, ann_threshold: int | None = DEFAULT_ANN_THRESHOLD, *, maintain: bool = True,
             **params: Any) -> tuple[NamespacedIndex, dict[str, Any]]:
        """Load an index saved by :meth:`save` (``params``: as for the constructor).

        Raises on any missing, corrupt or older-format file. With ``maintain``, partitions whose size
        or kind ask for a rebuild (a flat one past the threshold, an IVF one when ``ann_kind`` is
        HNSW) keep answering and are rebuilt in the background (:meth:`maintain`).
        """
        faiss = _faiss()
        folder = Path(folder)
        info = json.loads((folder / "meta.json").read_text())
        if info.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {info.get('format')} is not {INDEX_FORMAT}")
        idx = cls(int(info["dim"]), ann_threshold, **params)
        idx.revision = int(info["revision"])
        for ns, p in info["partitions"].items():
            if p["kind"] not in (FLAT, *ANN_KINDS):
                raise ValueError(f"index partition {ns!r} has unknown kind {p['kind']!r}")
            index = faiss.read_index(str(folder / f"{p['file']}.faiss"))
            part = idx._new_partition(kind=p["kind"], index=index)
            part.dead = int(p.get("dead", 0))
            if part.kind == HNSW:
                part.hnsw_m = int(faiss.downcast_index(index.index).hnsw.nb_neighbors(1))
            part.apply_params()
            slots = np.load(folder / f"{p['file']}.slots.npy").reshape(-1, 2)
            ids = json.loads((folder / f"{p['file']}.ids.json").read_text())
            if len(ids) != len(slots) or int(slots[:, 1].sum()) != part.ntotal or part.dead < 0:
                raise ValueError(f"index partition {ns!r} is inconsistent")
            for (slot, n), edit_id in zip(slots.tolist(), ids, strict=True):
                part.slot_of[edit_id] = slot
                part.edit_of[slot] = edit_id
                part.keys_of[slot] = n
            part.next_slot, part.trained_on = int(p["next_slot"]), int(p["trained_on"])
            idx._parts[ns] = part
        if maintain:
            idx.maintain()
        return idx, info
