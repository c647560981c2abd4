"""The FAISS vector index over edit embeddings: derived state, one partition per namespace.

Each namespace has its own FAISS index, so a search in namespace A cannot return an edit of
namespace B. An edit contributes one vector per retrieval key (rendered prompt, paraphrases); a
search returns edits ranked by their best key. Small partitions use exact inner-product search
(``IndexFlatIP``); a partition that grows past ``hnsw_threshold`` vectors switches to
``IndexHNSWFlat`` (see docs/retrieval.md for the measurements behind the threshold). HNSW cannot
delete, so removed vectors are tombstoned and the partition is rebuilt once a quarter is dead.

The index is saved beside the store with the store revision it reflects; ``EditMemory`` rebuilds it
from the store's saved embeddings when it is missing, corrupt or stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KEY_BITS = 6  # up to 64 retrieval keys per edit
INDEX_FORMAT = 1


def _faiss() -> Any:
    import faiss

    return faiss


@dataclass
class _Partition:
    """One namespace's vectors. FAISS ids are ``(slot << KEY_BITS) | key_number``."""

    dim: int
    kind: str = "flat"
    index: Any = None
    slot_of: dict[str, int] = field(default_factory=dict)
    edit_of: dict[int, str] = field(default_factory=dict)
    keys_of: dict[int, int] = field(default_factory=dict)  # slot -> number of vectors
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # kept for HNSW rebuilds
    dead: int = 0
    next_slot: int = 0

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = self._new_index(self.kind)

    def _new_index(self, kind: str) -> Any:
        faiss = _faiss()
        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        hnsw = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40
        hnsw.hnsw.efSearch = 64
        return faiss.IndexIDMap2(hnsw)

    @property
    def size(self) -> int:
        return int(self.index.ntotal) - self.dead

    def add(self, edit_id: str, vecs: np.ndarray) -> None:
        if edit_id in self.slot_of:
            self.remove(edit_id)
        vecs = np.ascontiguousarray(vecs[: 1 << KEY_BITS], dtype=np.float32)
        slot = self.next_slot
        self.next_slot += 1
        self.slot_of[edit_id] = slot
        self.edit_of[slot] = edit_id
        self.keys_of[slot] = len(vecs)
        ids = (np.int64(slot) << KEY_BITS) + np.arange(len(vecs), dtype=np.int64)
        self.index.add_with_ids(vecs, ids)
        if self.kind == "hnsw":
            self.vectors[slot] = vecs

    def remove(self, edit_id: str) -> bool:
        slot = self.slot_of.pop(edit_id, None)
        if slot is None:
            return False
        del self.edit_of[slot]
        n = self.keys_of.pop(slot)
        if self.kind == "flat":
            faiss = _faiss()
            self.index.remove_ids(faiss.IDSelectorRange(slot << KEY_BITS, (slot << KEY_BITS) + n))
        else:
            self.vectors.pop(slot, None)
            self.dead += n  # tombstone: filtered at search time
        return True

    def rebuild(self, kind: str) -> None:
        """Rebuild the FAISS index from the kept vectors (drops tombstones; may change kind)."""
        vecs_by_slot = self.vectors if self.kind == "hnsw" else self._reconstruct_all()
        self.kind = kind
        self.index = self._new_index(kind)
        self.vectors = {}
        self.dead = 0
        if vecs_by_slot:
            slots = sorted(vecs_by_slot)
            ids = np.concatenate([(np.int64(s) << KEY_BITS) + np.arange(len(vecs_by_slot[s])) for s in slots])
            self.index.add_with_ids(np.concatenate([vecs_by_slot[s] for s in slots]).astype(np.float32), ids)
            if kind == "hnsw":
                self.vectors = {s: vecs_by_slot[s] for s in slots}

    def _reconstruct_all(self) -> dict[int, np.ndarray]:
        out = {}
        for slot, n in self.keys_of.items():
            out[slot] = np.stack([self.index.reconstruct(int((slot << KEY_BITS) + j)) for j in range(n)])
        return out

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Best ``k`` edits per query row, by the max inner product over each edit's keys."""
        if self.index.ntotal == 0:
            return [[] for _ in range(len(queries))]
        fetch = min(int(self.index.ntotal), max(4 * k, k + 8) + self.dead)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch)
        out = []
        for srow, irow in zip(scores, ids, strict=True):
            best: dict[str, float] = {}
            for s, i in zip(srow, irow, strict=True):
                if i < 0:
                    continue
                edit_id = self.edit_of.get(int(i) >> KEY_BITS)
                if edit_id is not None and edit_id not in best:
                    best[edit_id] = float(s)  # results come sorted: the first hit is the best key
                    if len(best) == k:
                        break
            out.append(list(best.items()))
        return out


class NamespacedIndex:
    """One FAISS partition per namespace, with string edit ids.

    Args:
        dim: Embedding dimension.
        hnsw_threshold: Vectors in one namespace above which it switches from exact to HNSW search.
    """

    def __init__(self, dim: int, hnsw_threshold: int = 200_000) -> None:
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self._parts: dict[str, _Partition] = {}
        self.revision = 0

    def __len__(self) -> int:
        return sum(len(p.slot_of) for p in self._parts.values())

    def namespaces(self) -> list[str]:
        return sorted(self._parts)

    def contains(self, namespace: str, edit_id: str) -> bool:
        p = self._parts.get(namespace)
        return p is not None and edit_id in p.slot_of

    def add(self, namespace: str, edit_id: str, vectors: np.ndarray) -> None:
        """Index (or re-index) ``edit_id`` with its key vectors, shape ``(n_keys, dim)``."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        part = self._parts.get(namespace)
        if part is None:
            part = self._parts[namespace] = _Partition(self.dim)
        part.add(edit_id, vectors)
        if part.kind == "flat" and part.index.ntotal > self.hnsw_threshold:
            log.info("namespace %r passed %d vectors: switching to HNSW", namespace, self.hnsw_threshold)
            part.rebuild("hnsw")

    def remove(self, namespace: str, edit_id: str) -> bool:
        part = self._parts.get(namespace)
        if part is None or not part.remove(edit_id):
            return False
        if part.kind == "hnsw" and part.dead > part.index.ntotal // 4:
            part.rebuild("hnsw")
        return True

    def search(self, namespace: str, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top ``k`` ``(edit_id, score)`` per query row, within ``namespace`` only."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        part = self._parts.get(namespace)
        if part is None:
            return [[] for _ in range(len(queries))]
        return part.search(queries, k)

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, folder: str | Path, meta: dict[str, Any]) -> None:
        """Write every partition and a ``meta.json`` (with ``revision``) atomically into ``folder``."""
        faiss = _faiss()
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".index.", dir=folder.parent))
        try:
            parts = {}
            for ns, p in self._parts.items():
                fname = hashlib.sha1(ns.encode()).hexdigest()[:16]
                faiss.write_index(p.index, str(tmp / f"{fname}.faiss"))
                slots = sorted(p.edit_of)
                np.save(tmp / f"{fname}.slots.npy", np.array([[s, p.keys_of[s]] for s in slots], dtype=np.int64))
                (tmp / f"{fname}.ids.json").write_text(json.dumps([p.edit_of[s] for s in slots]))
                if p.kind == "hnsw":
                    np.savez(tmp / f"{fname}.vectors.npz", **{str(s): p.vectors[s] for s in slots})
                parts[ns] = {"file": fname, "kind": p.kind, "dead": p.dead, "next_slot": p.next_slot}
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
    def load(cls, folder: str | Path, hnsw_threshold: int = 200_000) -> tuple[NamespacedIndex, dict[str, Any]]:
        """Load an index saved by :meth:`save`. Raises on any missing or corrupt file."""
        faiss = _faiss()
        folder = Path(folder)
        info = json.loads((folder / "meta.json").read_text())
        if info.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {info.get('format')} is not {INDEX_FORMAT}")
        idx = cls(int(info["dim"]), hnsw_threshold)
        idx.revision = int(info["revision"])
        for ns, p in info["partitions"].items():
            part = _Partition(idx.dim, kind=p["kind"], index=faiss.read_index(str(folder / f"{p['file']}.faiss")))
            slots = np.load(folder / f"{p['file']}.slots.npy").reshape(-1, 2)
            ids = json.loads((folder / f"{p['file']}.ids.json").read_text())
            if len(ids) != len(slots):
                raise ValueError(f"index partition {ns!r} is inconsistent")
            for (slot, n), edit_id in zip(slots.tolist(), ids, strict=True):
                part.slot_of[edit_id] = slot
                part.edit_of[slot] = edit_id
                part.keys_of[slot] = n
            if part.kind == "hnsw":
                with np.load(folder / f"{p['file']}.vectors.npz") as z:
                    part.vectors = {int(s): z[s] for s in z.files}
            part.dead, part.next_slot = int(p["dead"]), int(p["next_slot"])
            idx._parts[ns] = part
        return idx, info
