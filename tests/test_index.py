"""Retrieval correctness of ``kem.index.NamespacedIndex`` against brute force on seeded synthetic vectors.

The data follows faiss ``contrib/datasets.py`` ``SyntheticDataset``: a 10-dimensional Gaussian
mapped into ``d`` dimensions through a random linear map and a sine (so the vectors have structure,
unlike uniform random ones), then L2-normalised as sentence embeddings are. Ground truth is numpy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kem.index import DEAD_FRACTION, FLAT, HNSW, IVF, KEY_BITS, NamespacedIndex, RWLock, _Partition, ivf_nlist

STRESS = Path(__file__).resolve().parents[1] / "bench" / "stress_index.py"

D = 32
K = 5


def synthetic(n: int, d: int = D, seed: int = 1338) -> np.ndarray:
    """``n`` unit vectors in ``d`` dimensions with intrinsic dimension ~10 (SyntheticDataset style)."""
    rs = np.random.RandomState(seed)
    x = rs.normal(size=(n, 10)) @ rs.rand(10, d)
    x = np.sin(x * (rs.rand(d) * 4 + 0.1)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def edits_of(x: np.ndarray, keys: int | np.ndarray, prefix: str = "e") -> tuple[list[str], list[np.ndarray]]:
    """Split rows of ``x`` into edits with ``keys`` vectors each (an int or one count per edit)."""
    counts = np.full(len(x) // keys, keys) if isinstance(keys, int) else keys
    bounds = np.concatenate([[0], np.cumsum(counts)])
    ids = [f"{prefix}{i}" for i in range(len(counts))]
    return ids, [x[bounds[i]:bounds[i + 1]] for i in range(len(counts))]


def brute_force(ids: list[str], vecs: list[np.ndarray], q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Exact top-``k`` edits per query by the max inner product over each edit's keys."""
    starts = np.concatenate([[0], np.cumsum([len(v) for v in vecs])[:-1]])
    sims = q @ np.concatenate(vecs).T  # (nq, n_vectors)
    best = np.maximum.reduceat(sims, starts, axis=1)  # (nq, n_edits): each edit's best key
    out = []
    for row in best:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([(ids[j], float(row[j])) for j in top])
    return out


def recall(got: list[list[tuple[str, float]]], truth: list[list[tuple[str, float]]]) -> float:
    """Mean fraction of the true top-k edit ids that were returned."""
    return float(np.mean([len({i for i, _ in g} & {i for i, _ in t}) / len(t) for g, t in zip(got, truth, strict=True)]))


def assert_exact(got: list[list[tuple[str, float]]], truth: list[list[tuple[str, float]]]) -> None:
    for g, t in zip(got, truth, strict=True):
        assert [s for _, s in g] == pytest.approx([s for _, s in t], abs=1e-5)
        # ids must agree except among exact ties
        assert {i for i, s in g if s > t[-1][1] + 1e-5} == {i for i, s in t if s > t[-1][1] + 1e-5}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = synthetic(24_200)
    return x[:24_000], x[24_000:]  # base vectors, queries (not indexed)


def test_flat_is_exact_with_varying_key_counts(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 9, size=1000)  # 1-8 keys per edit
    ids, vecs = edits_of(x[: counts.sum()], counts)
    idx = NamespacedIndex(D, ann_threshold=10_000)
    idx.add_many("ns", ids, vecs)
    assert idx.kind("ns") == FLAT and len(idx) == 1000
    for k in (1, K, 50):
        assert_exact(idx.search("ns", q, k), brute_force(ids, vecs, q, k))


def test_many_keys_per_edit_still_returns_k_distinct_edits() -> None:
    x = synthetic(2000, seed=7)
    # one edit owns 60 near-identical keys around the query: the first page is all that edit
    q = x[:1]
    crowd = q + 0.001 * np.random.default_rng(1).standard_normal((60, D)).astype(np.float32)
    ids, vecs = ["crowd", *edits_of(x[1:1001], 1)[0]], [crowd, *edits_of(x[1:1001], 1)[1]]
    idx = NamespacedIndex(D)
    idx.add_many("ns", ids, vecs)
    got = idx.search("ns", q, 10)[0]
    assert len(got) == 10 and len({i for i, _ in got}) == 10
    assert_exact([got], brute_force(ids, vecs, q, 10))


# Recall@5 on this data, measured for seeds 1338, 1, 2: IVF (620 lists, nprobe=64) 0.965, 0.962, 0.970
# (nprobe=32: 0.89-0.91; this 32-d data is harder for IVF than real embeddings); HNSW (M=32) 0.988 at
# efSearch=32 and 1.0 at 128 for seed 1338. The HNSW tests run at efSearch=32 so that a broken graph shows.
IVF_RECALL_BOUND = 0.93
IVF_NPROBE = 64
HNSW_RECALL_BOUND = 0.95
HNSW_EF = 32
ANN = [HNSW, IVF]


def ann_index(kind: str, threshold: int, **kw: object) -> NamespacedIndex:
    params = {"nprobe": IVF_NPROBE} if kind == IVF else {"ef_search": HNSW_EF}
    return NamespacedIndex(D, ann_threshold=threshold, ann_kind=kind, **{**params, **kw})  # type: ignore[arg-type]


def bound(kind: str) -> float:
    return IVF_RECALL_BOUND if kind == IVF else HNSW_RECALL_BOUND


@pytest.mark.parametrize("kind", ANN)
def test_ann_recall_against_brute_force(data: tuple[np.ndarray, np.ndarray], kind: str) -> None:
    x, q = data
    ids, vecs = edits_of(x, 2)  # 12k edits, 24k vectors
    idx = ann_index(kind, 5_000)
    idx.add_many("ns", ids, vecs)
    assert idx.wait(timeout=120) and idx.kind("ns") == kind
    got = idx.search("ns", q, K)
    truth = brute_force(ids, vecs, q, K)
    assert recall(got, truth) >= bound(kind)
    # scores are exact inner products for whatever is returned, best first
    vec_of = dict(zip(ids, vecs, strict=True))
    for qi, row in enumerate(got):
        assert len(row) == K
        for edit_id, s in row:
            assert s == pytest.approx(float((vec_of[edit_id] @ q[qi]).max()), abs=1e-5)
        assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)
    if kind == IVF:  # visiting every list is exhaustive: exact again
        idx._parts["ns"].index.nprobe = idx._parts["ns"].index.nlist
        assert_exact(idx.search("ns", q, K), truth)


KINDS = [(FLAT, 100_000), (HNSW, 1_000), (IVF, 1_000)]  # (expected kind of the 4000-vector partition, threshold)


@pytest.mark.parametrize(("kind", "threshold"), KINDS, ids=[k for k, _ in KINDS])
def test_namespaces_are_isolated(data: tuple[np.ndarray, np.ndarray], kind: str, threshold: int) -> None:
    x, q = data
    idx = NamespacedIndex(D, ann_threshold=threshold, ann_kind=IVF if kind == IVF else HNSW)
    a_ids, a_vecs = edits_of(x[:4000], 2, prefix="a")
    idx.add_many("A", a_ids, a_vecs)
    idx.add_many("B", [f"b{i}" for i in range(len(q))], [row[None, :] for row in q])  # B holds the queries
    idx.wait()
    for ns, prefix in (("A", "a"), ("B", "b")):
        for row in idx.search(ns, q, K):
            assert row and all(i.startswith(prefix) for i, _ in row)
    assert idx.search("C", q[:2], K) == [[], []]
    assert idx.namespaces() == ["A", "B"] and idx.contains("A", "a0") and not idx.contains("B", "a0")
    assert idx.kind("A") == kind


@pytest.mark.parametrize(("kind", "threshold"), KINDS, ids=[k for k, _ in KINDS])
def test_remove_and_re_add(data: tuple[np.ndarray, np.ndarray], kind: str, threshold: int) -> None:
    x, _ = data
    ids, vecs = edits_of(x[:6000], 3)
    idx = NamespacedIndex(D, ann_threshold=threshold, ann_kind=IVF if kind == IVF else HNSW)
    idx.add_many("ns", ids, vecs)
    idx.wait()
    assert idx.kind("ns") == kind
    part = idx._parts["ns"]
    q = vecs[10][:1]
    assert idx.search("ns", q, 1)[0][0][0] == "e10"
    assert idx.remove("ns", "e10") and not idx.remove("ns", "e10") and not idx.remove("other", "e10")
    assert not idx.contains("ns", "e10") and len(idx) == 1999
    assert part.ntotal == 5997  # live vectors
    # flat and IVF remove for real; HNSW keeps 3 tombstones in the graph
    assert (part.dead, part.index.ntotal) == ((3, 6000) if kind == HNSW else (0, 5997))
    assert all(i != "e10" for i, _ in idx.search("ns", q, 50)[0])
    idx.add("ns", "e10", vecs[10])
    assert idx.search("ns", q, 1)[0][0] == ("e10", pytest.approx(1.0, abs=1e-5))
    # re-adding an indexed id replaces its vectors
    idx.add("ns", "e10", vecs[11])
    assert part.ntotal == 6000
    assert {i for i, _ in idx.search("ns", vecs[11][:1], 2)[0]} == {"e10", "e11"}
    assert all(i != "e10" for i, _ in idx.search("ns", q, 3)[0])  # its old vectors are gone
    # one batch naming an id twice keeps the last vectors
    idx.add_many("ns", ["dup", "dup"], [vecs[0], vecs[1]])
    assert part.keys_of[part.slot_of["dup"]] == 3
    assert idx.search("ns", vecs[1][:1], 2)[0][0][0] in {"dup", "e1"}


@pytest.mark.parametrize(("kind", "threshold"), KINDS, ids=[k for k, _ in KINDS])
def test_save_load_round_trip(tmp_path, data: tuple[np.ndarray, np.ndarray], kind: str, threshold: int) -> None:
    x, q = data
    ids, vecs = edits_of(x[:6000], 2)
    params = {"ann_kind": IVF if kind == IVF else HNSW, "nprobe": 4, "ef_search": HNSW_EF}
    idx = NamespacedIndex(D, ann_threshold=threshold, **params)  # type: ignore[arg-type]
    idx.add_many("ns", ids, vecs)
    idx.add_many("other", ["o1"], [q[:1]])
    idx.wait()
    idx.remove("ns", "e3")
    idx.revision = 42
    idx.save(tmp_path / "index", {"embedder": "test"})
    back, info = NamespacedIndex.load(tmp_path / "index", threshold, **params)  # type: ignore[arg-type]
    assert info["embedder"] == "test" and back.revision == 42 and len(back) == len(idx)
    assert back.namespaces() == ["ns", "other"] and back.kind("ns") == idx.kind("ns") == kind
    assert back.describe("ns") == idx.describe("ns")  # HNSW: with its tombstone
    assert back.search("ns", q, K) == idx.search("ns", q, K)
    assert all(i != "e3" for i, _ in back.search("ns", vecs[3], 20)[0])  # a deleted id stays deleted
    # the loaded index keeps working: remove, add (new slots do not collide with old ones)
    assert back.remove("ns", "e4") and not back.contains("ns", "e4")
    back.add("ns", "new", q[:1])
    assert back.search("ns", q[:1], 1)[0][0][0] == "new"
    assert back.search("other", q[:1], 5)[0][0][0] == "o1"
    # saving over an existing folder replaces it atomically
    back.save(tmp_path / "index", {"embedder": "test"})
    again, _ = NamespacedIndex.load(tmp_path / "index", threshold, **params)  # type: ignore[arg-type]
    assert again.search("ns", q, K) == back.search("ns", q, K)


def test_hnsw_tombstones_never_come_back_and_trigger_a_background_rebuild(
        tmp_path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    ids, vecs = edits_of(x[:8000], 2)  # 4000 edits
    idx = ann_index(HNSW, 1_000)
    idx.add_many("ns", ids, vecs)
    idx.wait()
    part = idx._parts["ns"]
    # delete 15% of the edits (below DEAD_FRACTION: tombstones, no rebuild), the queries' nearest first
    near = [e for row in idx.search("ns", q[:60], 15) for e, _ in row]
    gone = list(dict.fromkeys(near + ids))[:600]
    for e in gone:
        assert idx.remove("ns", e)
    assert part.building is None and part.dead == 1200 and part.index.ntotal == 8000
    live = [i for i in ids if i not in set(gone)]
    live_vecs = [vecs[int(i[1:])] for i in live]
    probes = np.concatenate([q, *[vecs[int(e[1:])] for e in gone[:100]]])  # incl. the deleted vectors themselves

    def check(index: NamespacedIndex) -> None:
        got = index.search("ns", probes, 25)
        assert not {e for row in got for e, _ in row} & set(gone)
        assert all(len(row) == 25 for row in got)  # over-fetching made up for the tombstones
        # the queries' nearest neighbours are the tombstones: they crowd the graph search's candidates
        # (measured 0.94 at efSearch=32, k=25; 1.0 without deletions)
        assert recall(got[: len(q)], brute_force(live, live_vecs, q, 25)) >= 0.9

    check(idx)
    idx.save(tmp_path / "ix", {})
    back, _ = NamespacedIndex.load(tmp_path / "ix", 1_000, ef_search=HNSW_EF)
    assert back._parts["ns"].dead == 1200
    check(back)
    # passing DEAD_FRACTION rebuilds the graph from the live vectors, in the background
    more = live[: int(DEAD_FRACTION * 4000) - 600 + 10]
    for e in more:
        idx.remove("ns", e)
    gone += more
    live, live_vecs = live[len(more):], live_vecs[len(more):]
    assert idx.wait(timeout=60)
    # (the removals after the one that started the rebuild are tombstones of the new graph)
    assert part.kind == HNSW and part.dead <= 20 and part.index.ntotal == part.ntotal + part.dead
    assert part.ntotal == 2 * len(live)
    check(idx)


def test_writes_during_a_background_build_are_replayed(monkeypatch, data: tuple[np.ndarray, np.ndarray]) -> None:
    """Adds and removes made while the HNSW graph is built aside reach it before the swap; searches
    go on against the flat index meanwhile."""
    x, q = data
    ids, vecs = edits_of(x[:6000], 2)
    gate = threading.Event()
    real_build = _Partition._build

    def slow_build(self: _Partition, kind: str, *a: object, **kw: object) -> object:
        if kind == HNSW:
            assert gate.wait(30)
        return real_build(self, kind, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_Partition, "_build", slow_build)
    idx = ann_index(HNSW, 2_000)
    idx.add_many("ns", ids[:1100], vecs[:1100])  # 2200 vectors: the build starts and blocks
    part = idx._parts["ns"]
    assert part.building is not None and idx.kind("ns") == FLAT
    idx.add_many("ns", ids[1100:2000], vecs[1100:2000])
    for i in range(0, 1500, 3):
        idx.remove("ns", ids[i])
    idx.add("ns", ids[3], vecs[2999])  # re-added with other vectors
    assert_exact(idx.search("ns", q, K), brute_force(*live_of(idx, ids, vecs, {ids[3]: vecs[2999]}), q, K))
    assert not idx.wait(timeout=0.1)
    gate.set()
    assert idx.wait(timeout=60) and idx.kind("ns") == HNSW
    live_ids, live_vecs = live_of(idx, ids, vecs, {ids[3]: vecs[2999]})
    assert len(live_ids) == 1501 and part.ntotal == 3002
    got = idx.search("ns", q, K)
    assert recall(got, brute_force(live_ids, live_vecs, q, K)) >= HNSW_RECALL_BOUND
    assert idx.search("ns", vecs[2999][:1], 2)[0][0][0] in {ids[3], ids[2999]}
    removed = {ids[j] for j in range(0, 1500, 3)} - {ids[3]}
    assert not removed & {i for row in idx.search("ns", q, 30) for i, _ in row}


def live_of(idx: NamespacedIndex, ids: list[str], vecs: list[np.ndarray],
            replaced: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    live = [i for i in ids if idx.contains("ns", i)]
    return live, [replaced.get(i, vecs[int(i[1:])]) for i in live]


def test_load_rebuilds_in_the_background_what_the_size_or_kind_asks(tmp_path, data: tuple[np.ndarray, np.ndarray]) -> None:
    """An IVF partition saved by an IVF index comes back as HNSW; a flat one saved past the threshold
    (saved while its build ran) gets its build; both answer meanwhile."""
    x, q = data
    ids, vecs = edits_of(x[:6000], 2)
    ivf = ann_index(IVF, 1_000)
    ivf.add_many("ns", ids, vecs)
    ivf.wait()
    ivf.save(tmp_path / "ivf", {})
    flat = ann_index(HNSW, 100_000)
    flat.add_many("ns", ids, vecs)
    flat.save(tmp_path / "flat", {})
    for name, was in (("ivf", IVF), ("flat", FLAT)):
        back, _ = NamespacedIndex.load(tmp_path / name, 1_000, maintain=False, ef_search=HNSW_EF)
        assert back.kind("ns") == was and back._parts["ns"].building is None
        back, _ = NamespacedIndex.load(tmp_path / name, 1_000, ef_search=HNSW_EF)
        assert len(back.search("ns", q, K)) == len(q)
        assert back.wait(timeout=60) and back.kind("ns") == HNSW and back._parts["ns"].ntotal == 6000
        assert recall(back.search("ns", q, K), brute_force(ids, vecs, q, K)) >= HNSW_RECALL_BOUND


def test_load_rejects_corrupt_or_old_format(tmp_path) -> None:
    idx = NamespacedIndex(D)
    idx.add("ns", "a", synthetic(2))
    idx.save(tmp_path / "ix", {})
    meta = (tmp_path / "ix" / "meta.json")
    meta.write_text(meta.read_text().replace('"format": 2', '"format": 1'))
    with pytest.raises(ValueError, match="format"):
        NamespacedIndex.load(tmp_path / "ix")
    idx.save(tmp_path / "ix", {})
    next((tmp_path / "ix").glob("*.ids.json")).write_text("[]")
    with pytest.raises(ValueError, match="inconsistent"):
        NamespacedIndex.load(tmp_path / "ix")
    # a truncated HNSW graph fails to load (EditMemory then rebuilds from the store)
    hnsw = ann_index(HNSW, 100)
    ids, vecs = edits_of(synthetic(400), 2)
    hnsw.add_many("ns", ids, vecs)
    hnsw.wait()
    assert hnsw.kind("ns") == HNSW
    hnsw.save(tmp_path / "hx", {})
    graph = next((tmp_path / "hx").glob("*.faiss"))
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(RuntimeError):
        NamespacedIndex.load(tmp_path / "hx")


def test_switches_flat_to_ivf_retrains_and_back(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    ids, vecs = edits_of(x[:16_000], 2)  # 8000 edits
    idx = ann_index(IVF, 2_000)
    idx.add_many("ns", ids[:900], vecs[:900])  # 1800 vectors: still exact
    assert idx.kind("ns") == FLAT
    before = idx.search("ns", q, K)
    idx.add_many("ns", ids[900:1100], vecs[900:1100])  # 2200 vectors: IVF, built in the background
    idx.wait()
    part = idx._parts["ns"]
    assert idx.kind("ns") == IVF and part.trained_on == 2200 and part.index.nlist == ivf_nlist(2200)
    truth = brute_force(ids[:1100], vecs[:1100], q, K)
    assert recall(idx.search("ns", q, K), truth) >= IVF_RECALL_BOUND
    # the edits indexed before the switch are all still there, with their exact scores
    truth900 = brute_force(ids[:900], vecs[:900], q, K)
    assert before == [[(i, pytest.approx(s, abs=1e-5)) for i, s in row] for row in truth900]
    for i in range(0, 1100, 97):
        assert idx.search("ns", vecs[i][:1], 1)[0][0][0] == ids[i]
    # growing past RETRAIN_GROWTH x 2200 vectors retrains with more lists (at 8802, one edit at a time)
    idx.add_many("ns", ids[1100:4000], vecs[1100:4000])
    for i in range(4000, 4500):
        idx.add("ns", ids[i], vecs[i])
    idx.wait()
    part = idx._parts["ns"]
    assert part.trained_on == 8802 and part.index.nlist == ivf_nlist(8802) and len(idx) == 4500
    assert recall(idx.search("ns", q, K), brute_force(ids[:4500], vecs[:4500], q, K)) >= IVF_RECALL_BOUND
    # shrinking below half the threshold goes back to exact search, with the survivors only
    for i in range(400, 4500):
        idx.remove("ns", ids[i])
    assert idx.kind("ns") == FLAT and len(idx) == 400 and idx._parts["ns"].ntotal == 800
    assert_exact(idx.search("ns", q, K), brute_force(ids[:400], vecs[:400], q, K))


def test_hnsw_switch_has_hysteresis(data: tuple[np.ndarray, np.ndarray]) -> None:
    """flat -> HNSW past the threshold, HNSW kept down to half of it, flat below; exact again there."""
    x, q = data
    ids, vecs = edits_of(x[:6000], 2)
    idx = ann_index(HNSW, 2_000)
    idx.add_many("ns", ids[:1000], vecs[:1000])  # 2000 vectors: not past the threshold
    assert idx.kind("ns") == FLAT and idx._parts["ns"].building is None
    idx.add("ns", ids[1000], vecs[1000])
    idx.wait()
    assert idx.kind("ns") == HNSW
    for i in range(1000, 500, -1):  # down to 1002 vectors: still HNSW (no flip-flop around 2000)
        idx.remove("ns", ids[i])
    idx.wait()
    assert idx.kind("ns") == HNSW and idx._parts["ns"].ntotal == 1002
    idx.add_many("ns", ids[501:1100], vecs[501:1100])  # back over 2000: nothing to rebuild, no flip
    idx.wait()
    assert idx.kind("ns") == HNSW
    for i in range(1099, 498, -1):  # 998 vectors: below half the threshold, exact
        idx.remove("ns", ids[i])
    idx.wait()  # (deletes may have started a compaction: the switch to flat follows it)
    assert idx.kind("ns") == FLAT and idx._parts["ns"].ntotal == 998
    assert_exact(idx.search("ns", q, K), brute_force(ids[:499], vecs[:499], q, K))


def test_hnsw_partitions_past_hnsw_max_use_ivf(data: tuple[np.ndarray, np.ndarray]) -> None:
    """flat -> HNSW -> IVF past ``hnsw_max``, back to HNSW below half of it (hysteresis)."""
    x, q = data
    ids, vecs = edits_of(x[:8000], 2)
    idx = ann_index(HNSW, 1_000, hnsw_max=3_000)
    idx.add_many("ns", ids[:1000], vecs[:1000])
    idx.wait()
    assert idx.kind("ns") == HNSW
    idx.add_many("ns", ids[1000:2000], vecs[1000:2000])  # 4000 vectors
    idx.wait()
    assert idx.kind("ns") == IVF and idx._parts["ns"].ntotal == 4000
    for i in range(2000 - 1, 800 - 1, -1):  # 1600 vectors: still IVF
        idx.remove("ns", ids[i])
    idx.wait()
    assert idx.kind("ns") == IVF
    for i in range(800 - 1, 700 - 1, -1):  # 1400 vectors: HNSW again
        idx.remove("ns", ids[i])
    idx.wait()
    assert idx.kind("ns") == HNSW and idx._parts["ns"].ntotal == 1400
    assert recall(idx.search("ns", q, K), brute_force(ids[:700], vecs[:700], q, K)) >= HNSW_RECALL_BOUND


def test_large_hnsw_partitions_search_with_a_larger_ef(monkeypatch, data: tuple[np.ndarray, np.ndarray]) -> None:
    """Past ``HNSW_LARGE_VECTORS`` an HNSW partition's efSearch rises to ``LARGE_EF_SEARCH`` (and its
    efConstruction to ``LARGE_EF_CONSTRUCTION``), and back below it."""
    import kem.index as kem_index

    monkeypatch.setattr(kem_index, "HNSW_LARGE_VECTORS", 3_000)
    monkeypatch.setattr(kem_index, "LARGE_EF_SEARCH", 300)
    x, q = data
    ids, vecs = edits_of(x[:4000], 2)
    idx = ann_index(HNSW, 1_000, ef_search=64)
    idx.add_many("ns", ids[:1000], vecs[:1000])  # 2000 vectors
    idx.wait()
    assert idx.kind("ns") == HNSW and "efSearch=64 " in (idx.describe("ns") or "")
    idx.add_many("ns", ids[1000:2000], vecs[1000:2000])  # 4000 vectors: grown in place, no rebuild
    assert idx.kind("ns") == HNSW and "efSearch=300 " in (idx.describe("ns") or "")
    import faiss

    graph = faiss.downcast_index(idx._parts["ns"].index.index).hnsw
    assert (graph.efSearch, graph.efConstruction) == (300, kem_index.LARGE_EF_CONSTRUCTION)
    assert recall(idx.search("ns", q, K), brute_force(ids[:2000], vecs[:2000], q, K)) >= HNSW_RECALL_BOUND
    for i in range(2000 - 1, 1400 - 1, -1):  # 2800 vectors (tombstones do not count)
        idx.remove("ns", ids[i])
    idx.wait()
    assert faiss.downcast_index(idx._parts["ns"].index.index).hnsw.efSearch == 64


def test_rejects_bad_input() -> None:
    idx = NamespacedIndex(D)
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        idx.add("ns", "a", np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="differ in length"):
        idx.add_many("ns", ["a", "b"], [np.zeros((1, D), np.float32)])
    with pytest.raises(ValueError, match="nprobe"):
        NamespacedIndex(D, nprobe=0)
    with pytest.raises(ValueError, match="ann_kind"):
        NamespacedIndex(D, ann_kind="annoy")
    with pytest.raises(ValueError, match="ef_search"):
        NamespacedIndex(D, ef_search=0)
    assert idx.search("ns", np.zeros(D, np.float32), 3) == [[]]
    # more than 2**KEY_BITS keys: the extra ones are ignored
    idx.add("ns", "big", synthetic((1 << KEY_BITS) + 5))
    assert idx._parts["ns"].ntotal == 1 << KEY_BITS


def test_concurrent_search_add_delete_rebuild_save() -> None:
    """Searches, adds, deletes, flat<->IVF rebuilds and saves from 7 threads for a few seconds.

    Run in a child process: FAISS used unlocked segfaults (rc -11), which must fail this test, not
    end pytest. The child checks every search result and saved index as it goes, and the index
    against brute force at the end (bench/stress_index.py runs the same for longer).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(STRESS), "--child", "--seconds", "3", "--seed", "7"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["consistent"] and res["n_errors"] == 0, res
    assert all(res["ops"].get(kind, 0) > 0 for kind in ("search", "add", "delete", "rebuild", "save")), res


def test_rwlock_readers_share_writers_wait() -> None:
    lock = RWLock()
    inside, release = threading.Barrier(3, timeout=10), threading.Event()
    wrote = threading.Event()

    def reader() -> None:
        with lock.read():
            inside.wait()  # both readers hold the lock at once, or this times out
            release.wait(10)

    def writer() -> None:
        with lock.write():
            wrote.set()

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    inside.wait()
    w = threading.Thread(target=writer)
    w.start()
    assert not wrote.wait(0.2)  # the writer waits for the readers
    release.set()
    assert wrote.wait(10)
    for t in [*readers, w]:
        t.join(10)


def test_memory_sync_after_a_stale_revision_read_does_not_rebuild(embedder, monkeypatch) -> None:
    """Two threads read the store's revision, one syncs past it: the late one must not see "the
    store went back in time" and rebuild the whole index."""
    from kem.edit import Edit
    from kem.memory import EditMemory
    from kem.stores.in_memory import InMemoryStore

    mem = EditMemory(InMemoryStore(), embedder)
    mem.add_many([Edit(subject="Paris", prompt="{} is the capital of", target_new="Italy")])
    before = mem.store.revision()
    mem.store.add(Edit(subject="Rome", prompt="{} is the capital of", target_new="France"))
    reads = iter([before])  # this thread read the revision before another thread synced
    real = mem.store.revision
    monkeypatch.setattr(mem.store, "revision", lambda: next(reads, None) or real())
    mem.index.revision = real()  # ... the other thread's sync
    rebuilds = []
    monkeypatch.setattr(mem, "rebuild", lambda *a, **k: rebuilds.append(1))
    mem.sync()
    assert rebuilds == []
