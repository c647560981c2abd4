"""Big-partition index benchmark: which FAISS index serves one namespace of up to 1M vectors.

One run builds (or loads from the on-disk cache) each candidate index over the same vectors, sweeps
its search knob, and prints one table: index, build time (and threads), memory (the size
``faiss.write_index`` writes: what the index holds in RAM), p50/p99 of one query at a time on 1 thread
(``faiss.omp_set_num_threads(1)``), and recall@4 = |approximate top-4 ∩ exact top-4| / 4 per query
group. The load average is printed with every row.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python bench/bench_index.py --n 1000000 --data realistic
    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python bench/bench_index.py --n 1000000 --data tiled

Data (docs/retrieval.md, "Big partitions"):

- ``realistic``: the 40,000 real MiniLM key embeddings of the 20k CounterFact edits (rendered prompt
  and fact), plus ``n - 40,000`` vectors sampled from a Gaussian mixture fitted to them (spherical
  k-means into 1,024 clusters, each with its own full covariance shrunk toward the pooled
  within-cluster covariance, samples re-normalised), one vector per edit. Queries: 1,000 real
  held-out CounterFact paraphrases (not indexed; their edit's two keys are) and 1,000 fresh samples of
  the mixture (not indexed).
- ``tiled``: the old set: the 20k edits' real key pairs tiled with Gaussian noise (σ = 0.02 per
  dimension), 2 vectors per edit (``n / 2`` edits); queries: 1,000 locality prompts and 1,000
  held-out paraphrases. Copies of one edit are near-duplicates, so many neighbours are nearly tied.

Exact top-4 (edits, best key per edit) comes from ``faiss.knn`` on all threads. Built indexes are
cached under ``$KEM_BENCH_INDEX_CACHE`` (default ``/tmp/kem-bench-index``) with their build time, so a
sweep reuses them; ``--rebuild`` ignores the cache.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import (  # noqa: E402
    N_QUERIES,
    RealData,
    cache_dir,
    pct,
    query_pick,
    query_texts,
    real_data,
    tiled_vectors,
    timed,
    to_edit,
)

INDEX_CACHE = Path(os.environ.get("KEM_BENCH_INDEX_CACHE", "/tmp/kem-bench-index"))
MIX_CLUSTERS, MIX_SHRINK = 1024, 50.0  # mixture components; pseudo-count of the pooled covariance


def load() -> str:
    return "load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


# ---- data ---------------------------------------------------------------------------------------------
def real_keys(data: RealData) -> np.ndarray:
    """The real key vectors of the 20k CounterFact edits, shape ``(edits, 2, dim)``."""
    return np.stack([np.stack([data.text_vec[t] for t in to_edit(r, paraphrase=False).retrieval_keys()])
                     for r in data.records])


@dataclass
class KeyMixture:
    """A Gaussian mixture over unit key vectors: ``means`` ``(K, d)``, Cholesky factors ``(K, d, d)``."""

    means: np.ndarray
    chol: np.ndarray
    weights: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, k: int = MIX_CLUSTERS, shrink: float = MIX_SHRINK, seed: int = 0) -> KeyMixture:
        """Spherical k-means into ``k`` clusters; each gets its mean and its covariance shrunk toward the
        pooled within-cluster covariance with weight ``shrink`` (a cluster has ~40 points in 384 dims)."""
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, min_points_per_centroid=1)
        km.train(x)
        lab = km.index.search(x, 1)[1].ravel()
        means = np.stack([x[lab == c].mean(0) for c in range(k)]).astype(np.float32)
        res = x - means[lab]
        pooled = res.T @ res / len(x)
        chol = np.empty((k, x.shape[1], x.shape[1]), np.float32)
        for c in range(k):
            r = res[lab == c]
            cov = (r.T @ r + shrink * pooled) / (len(r) + shrink)
            chol[c] = np.linalg.cholesky(cov + 1e-6 * np.eye(len(cov)))
        return cls(means, chol, np.bincount(lab, minlength=k) / len(x))

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` unit vectors, shape ``(n, d)`` float32."""
        rng = np.random.default_rng(seed)
        lab = rng.choice(len(self.weights), n, p=self.weights)
        out = np.empty((n, self.means.shape[1]), np.float32)
        order, lo = np.argsort(lab, kind="stable"), 0
        for c, cnt in enumerate(np.bincount(lab, minlength=len(self.weights))):
            z = rng.standard_normal((cnt, self.means.shape[1]), dtype=np.float32)
            out[order[lo:lo + cnt]] = self.means[c] + z @ self.chol[c].T
            lo += cnt
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def key_mixture(keys: np.ndarray) -> KeyMixture:
    """The mixture fitted to ``keys`` (cached under ``$KEM_CACHE_DIR/bench``)."""
    tag = hashlib.sha1(keys.tobytes()).hexdigest()[:12]
    path = cache_dir() / f"key-mixture-{MIX_CLUSTERS}-{MIX_SHRINK:g}-{tag}.npz"
    if path.is_file():
        z = np.load(path)
        return KeyMixture(z["means"], z["chol"], z["weights"])
    mix = KeyMixture.fit(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, means=mix.means, chol=mix.chol, weights=mix.weights)
    return mix


def nn_profile(x: np.ndarray, q: np.ndarray) -> str:
    """Median cosine of the 1st, 4th and 10th neighbour, and of the 4th-5th gap (ties)."""
    import faiss

    d, _ = faiss.knn(np.ascontiguousarray(q), x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    return (f"1st {np.median(d[:, 0]):.3f}, 4th {np.median(d[:, 3]):.3f}, 10th {np.median(d[:, 9]):.3f}, "
            f"4th-5th gap {np.median(d[:, 3] - d[:, 4]):.4f}")


@dataclass
class Workload:
    """``n`` vectors (``keys`` consecutive vectors per edit), query groups and the exact answers."""

    tag: str
    x: np.ndarray  # (n, dim) float32
    keys: int
    qv: np.ndarray  # (queries, dim)
    group: list[str]  # per query: "paraphrase", "locality" or "sample"
    own: list[set[int] | None]  # a paraphrase query's own edit numbers
    truth4: list[list[int]] = field(default_factory=list)

    @property
    def edits(self) -> int:
        return len(self.x) // self.keys

    def quality(self, got4: list[list[int]]) -> tuple[float, dict[str, float], float]:
        """recall@4 over all queries, per group, and own@4 (a paraphrase's edit among the 4)."""
        rec = np.array([len(set(g) & set(t)) / len(t) for g, t in zip(got4, self.truth4, strict=True)])
        groups = {name: float(rec[[i for i, g in enumerate(self.group) if g == name]].mean())
                  for name in dict.fromkeys(self.group)}
        own = [bool(o & set(g)) for o, g in zip(self.own, got4, strict=True) if o is not None]
        return float(rec.mean()), groups, float(np.mean(own))


def workload(data: RealData, kind: str, n: int, n_queries: int) -> Workload:
    """The ``kind`` (``realistic`` or ``tiled``) data set of ``n`` vectors, with exact top-4 (cached)."""
    import faiss

    keys = real_keys(data)
    texts, pick, half = query_texts(data.records), query_pick(data.records), N_QUERIES // 2
    para = [(data.text_vec[texts[half + j]], int(pick[half + j])) for j in range(n_queries // 2)]
    if kind == "realistic":
        real = keys.reshape(-1, keys.shape[2])[:n]
        mix = key_mixture(keys.reshape(-1, keys.shape[2]))
        x = np.concatenate([real, mix.sample(n - len(real), seed=1)]) if n > len(real) else real.copy()
        qv = np.concatenate([np.stack([v for v, _ in para]), mix.sample(n_queries - len(para), seed=2)])
        group = ["paraphrase"] * len(para) + ["sample"] * (n_queries - len(para))
        own: list[set[int] | None] = [{2 * r, 2 * r + 1} for _, r in para] + [None] * (n_queries - len(para))
        w = Workload(f"realistic-{n}", x, 1, qv, group, own)
    elif kind == "tiled":
        x3 = tiled_vectors(data, n // 2, 0.02)
        loc = [data.text_vec[t] for t in texts[: n_queries - len(para)]]
        qv = np.stack(loc + [v for v, _ in para])
        group = ["locality"] * len(loc) + ["paraphrase"] * len(para)
        own = [None] * len(loc) + [{r} if r < n // 2 else set() for _, r in para]
        w = Workload(f"tiled-{n}", x3.reshape(-1, x3.shape[2]), 2, qv, group, own)
        del x3
    else:
        raise ValueError(f"--data must be realistic or tiled (got {kind!r})")
    w.qv = np.ascontiguousarray(w.qv, dtype=np.float32)
    path = INDEX_CACHE / f"{w.tag}-q{n_queries}-truth.npy"
    if path.is_file():
        w.truth4 = np.load(path).tolist()
    else:
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # ground truth only
        _, ids = faiss.knn(w.qv, w.x, 4 * w.keys + 8, metric=faiss.METRIC_INNER_PRODUCT)
        w.truth4 = [first_edits(row, w.keys, 4) for row in ids.tolist()]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.array(w.truth4))
        print(f"exact top-4 of {len(w.qv)} queries over {len(w.x):,} vectors: {time.perf_counter() - t0:.0f} s "
              f"({load()})", flush=True)
    return w


def first_edits(row: Sequence[int], keys: int, k: int) -> list[int]:
    """The first ``k`` distinct edit numbers of a ranked row of vector numbers (best key per edit)."""
    seen: list[int] = []
    for i in row:
        if i >= 0 and i // keys not in seen:
            seen.append(i // keys)
            if len(seen) == k:
                break
    return seen


# ---- candidates -----------------------------------------------------------------------------------------
@dataclass
class IndexRow:
    """One line of the index table."""

    index: str
    data: str
    vectors: int
    build: str
    mib: float
    p50: float
    p99: float
    recall4: float
    groups: dict[str, float]
    own4: float
    load: str


def index_table(rows: Sequence[IndexRow]) -> str:
    lines = ["| index | data (vectors) | build s (threads) | memory MiB | p50 ms | p99 ms | recall@4 | by query group "
             "| own@4 | load |", "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        groups = ", ".join(f"{g} {v:.3f}" for g, v in r.groups.items())
        lines.append(f"| {r.index} | {r.data} ({r.vectors:,}) | {r.build} | {r.mib:.0f} | {r.p50:.3f} | {r.p99:.2f} "
                     f"| {r.recall4:.3f} | {groups} | {r.own4:.3f} | {r.load} |")
    return "\n".join(lines)


def index_mib(index: object) -> float:
    """MiB of the FAISS index as ``write_index`` writes it (vectors, codes, graph links, id maps)."""
    import faiss

    with tempfile.NamedTemporaryFile(suffix=".faiss", dir=INDEX_CACHE) as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name) / 2**20


def measure(name: str, w: Workload, search: Callable[[np.ndarray, int], list[list[int]]], build: str, mib: float,
            n_timed: int) -> IndexRow:
    """p50/p99 of one query at a time on 1 thread (queries interleaved across groups), and recall@4."""
    import faiss

    faiss.omp_set_num_threads(1)
    order = np.argsort(np.arange(len(w.qv)) % (len(w.qv) // 2), kind="stable")  # 0, 1000, 1, 1001, ...
    for i in order[:20]:  # warm-up
        search(w.qv[i:i + 1], 4)
    ms = timed(lambda j: search(w.qv[order[j]:order[j] + 1], 4), min(n_timed, len(w.qv)))
    got4 = [search(w.qv[i:i + 1], 4)[0] for i in range(len(w.qv))]
    p50, p99 = pct(ms)
    rec, groups, own = w.quality(got4)
    return IndexRow(name, w.tag.split("-")[0], len(w.x), build, mib, p50, p99, rec, groups, own, load())


def raw_search(index: object, keys: int) -> Callable[[np.ndarray, int], list[list[int]]]:
    """Top-k edits of a raw FAISS index (as kem does: 4k+8 vectors fetched, best key per edit)."""

    def search(q: np.ndarray, k: int) -> list[list[int]]:
        _, ii = index.search(q, 4 * k + 8)  # type: ignore[attr-defined]
        return [first_edits(row, keys, k) for row in ii.tolist()]

    return search


def new_index(cand: str, d: int, m: int, nlist: int, efc: int) -> object:
    """An empty FAISS index for candidate ``cand`` (inner product)."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if cand == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, ip)
    elif cand == "hnsw-sq8":
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, m, ip)
    elif cand in ("ivf-hnsw", "ivf-hnsw-sq8"):
        quantizer = faiss.IndexHNSWFlat(d, 32, ip)
        quantizer.hnsw.efConstruction = 80
        if cand == "ivf-hnsw":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, ip)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
        index.own_fields = True
        quantizer.this.disown()
        index.cp.spherical, index.cp.niter, index.cp.seed = True, 10, 1234
        index.cp.max_points_per_centroid = 32
        return index
    else:
        raise ValueError(f"unknown candidate {cand!r} (hnsw, hnsw-sq8, ivf-hnsw, ivf-hnsw-sq8)")
    index.hnsw.efConstruction = efc
    return index


def build_or_load(spec: str, w: Workload, args: argparse.Namespace) -> tuple[object, str]:
    """Candidate ``spec`` (``kind:M`` for HNSW, ``kind:nlist`` for IVF) over ``w.x``, from the cache if built."""
    import faiss

    cand, num = spec.split(":")
    hnsw = cand.startswith("hnsw")
    name = f"{cand}-{'M' if hnsw else 'nlist'}{num}" + (f"-efc{args.ef_construction}" if hnsw else "")
    path = INDEX_CACHE / f"{w.tag}-{name}.faiss"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and not args.rebuild:
        info = json.loads(meta.read_text())
        print(f"{name}: loaded from {path} (built in {info['build_s']:.0f} s, {info['load']})", flush=True)
        return faiss.read_index(str(path)), f"{info['build_s']:.0f} ({info['threads']})"
    index = new_index(cand, w.x.shape[1], int(num), int(num), args.ef_construction)
    faiss.omp_set_num_threads(args.build_threads)
    print(f"{name}: building over {len(w.x):,} vectors on {args.build_threads} threads ({load()})", flush=True)
    t0 = time.perf_counter()
    if not hnsw or cand == "hnsw-sq8":
        rng = np.random.default_rng(0)
        sample = w.x[np.sort(rng.choice(len(w.x), min(len(w.x), 32 * int(num) if not hnsw else 100_000),
                                        replace=False))]
        index.train(sample)  # type: ignore[attr-defined]
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s ({load()})", flush=True)
    for lo in range(0, len(w.x), 100_000):
        index.add(w.x[lo:lo + 100_000])  # type: ignore[attr-defined]
        print(f"{name}: {min(len(w.x), lo + 100_000):,} added, {time.perf_counter() - t0:.0f} s ({load()})", flush=True)
    build_s = time.perf_counter() - t0
    faiss.write_index(index, str(path))
    meta.write_text(json.dumps({"build_s": build_s, "threads": args.build_threads, "load": load()}))
    return index, f"{build_s:.0f} ({args.build_threads})"


def bench_candidate(spec: str, w: Workload, args: argparse.Namespace) -> list[IndexRow]:
    """Build (or load) ``spec`` and sweep its search knob (efSearch for HNSW, nprobe for IVF)."""
    import faiss

    index, build = build_or_load(spec, w, args)
    mib = index_mib(index)
    rows = []
    cand, num = spec.split(":")
    for v in args.ef if cand.startswith("hnsw") else args.nprobe:
        if cand.startswith("hnsw"):
            index.hnsw.efSearch = v  # type: ignore[attr-defined]
            name = f"{cand} M={num} efC={args.ef_construction} efSearch={v}"
        else:
            index.nprobe = v  # type: ignore[attr-defined]
            faiss.downcast_index(index.quantizer).hnsw.efSearch = max(2 * v, 64)  # type: ignore[attr-defined]
            name = f"{cand} nlist={num} nprobe={v}"
        rows.append(measure(name, w, raw_search(index, w.keys), build, mib, args.timed))
        print(index_table(rows[-1:]).splitlines()[-1], flush=True)
    del index
    gc.collect()
    return rows


def bench_kem(w: Workload, args: argparse.Namespace) -> IndexRow:
    """kem's own partition (its automatic choice by size), filled through ``add_many`` in chunks."""
    import faiss

    from kem.index import NamespacedIndex

    faiss.omp_set_num_threads(args.build_threads)
    idx = NamespacedIndex(w.x.shape[1])
    x3 = w.x.reshape(w.edits, w.keys, -1)
    ids = [f"e{i}" for i in range(w.edits)]
    t0 = time.perf_counter()
    for lo in range(0, w.edits, args.chunk):
        idx.add_many("bench", ids[lo:lo + args.chunk], list(x3[lo:lo + args.chunk]))
        idx.wait()
    build_s = time.perf_counter() - t0

    def search(q: np.ndarray, k: int) -> list[list[int]]:
        return [[int(e[1:]) for e, _ in row] for row in idx.search("bench", q, k)]

    row = measure(f"kem {idx.describe('bench')}", w, search, f"{build_s:.0f} ({args.build_threads})",
                  index_mib(idx._parts["bench"].index), args.timed)
    print(index_table([row]).splitlines()[-1], flush=True)
    return row


def run(args: argparse.Namespace) -> list[IndexRow]:
    INDEX_CACHE.mkdir(parents=True, exist_ok=True)
    data = real_data()
    rows: list[IndexRow] = []
    for kind in args.data:
        t0 = time.perf_counter()
        w = workload(data, kind, args.n, args.queries)
        print(f"[{kind}, {len(w.x):,} vectors, {w.edits:,} edits] data and exact top-4 in "
              f"{time.perf_counter() - t0:.0f} s ({load()})", flush=True)
        if args.profile:  # how tied the neighbours are, per query group
            for g in dict.fromkeys(w.group):
                q = w.qv[[i for i, gg in enumerate(w.group) if gg == g]]
                print(f"  neighbour cosines, {g} queries: {nn_profile(w.x, q)}", flush=True)
        for spec in args.candidates:
            rows += bench_candidate(spec, w, args)
        if args.kem:
            rows.append(bench_kem(w, args))
        del w
        gc.collect()
    return rows


def main(argv: Sequence[str] | None = None) -> list[IndexRow]:
    def ints(s: str) -> list[int]:
        return [int(v) for v in s.split(",") if v.strip()]

    def names(s: str) -> list[str]:
        return [v for v in s.split(",") if v.strip() and v != "none"]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the namespace")
    p.add_argument("--data", type=names, default=["realistic"], help="realistic, tiled or both (comma-separated)")
    p.add_argument("--candidates", type=names, default=["hnsw:32", "ivf-hnsw:8192", "ivf-hnsw-sq8:8192"],
                   help="kind:M (hnsw, hnsw-sq8) or kind:nlist (ivf-hnsw, ivf-hnsw-sq8)")
    p.add_argument("--ef", type=ints, default=[64, 128, 256], help="HNSW efSearch values to sweep")
    p.add_argument("--nprobe", type=ints, default=[16, 32, 64], help="IVF nprobe values to sweep")
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--queries", type=int, default=N_QUERIES, help="queries (half in each group)")
    p.add_argument("--timed", type=int, default=1000, help="queries timed one at a time")
    p.add_argument("--kem", action="store_true", help="also build kem's own partition (its choice by size)")
    p.add_argument("--chunk", type=int, default=100_000, help="--kem: edits per add_many call")
    p.add_argument("--profile", action="store_true", help="print neighbour-cosine medians per query group")
    p.add_argument("--rebuild", action="store_true", help="ignore cached indexes")
    args = p.parse_args(argv)
    load0 = load()
    print(f"{load0} at the start ({os.cpu_count()} cores)", flush=True)
    t0 = time.perf_counter()
    rows = run(args)
    print()
    print(index_table(rows))
    print(f"\n{load0} at the start, {load()} at the end; {time.perf_counter() - t0:.0f} s in all; search: 1 query at "
          f"a time, k=4, faiss.omp_set_num_threads(1); builds on {args.build_threads} threads")
    return rows


if __name__ == "__main__":
    main()
