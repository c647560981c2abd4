"""Big-partition index benchmark: which FAISS index serves one namespace of up to 1M edits.

For each size, one run builds today's IVF (kem's ``ann_kind="ivf"``), kem's HNSW partition and raw
FAISS alternatives over the same vectors, and prints one table: index kind, edits (vectors), build
time, memory (the size ``faiss.write_index`` writes, which is what the index holds in RAM), p50/p99
of one search at 1 thread, recall@4 against exact search, own@4, and the p50 ratio against today's
IVF measured in the same run. The load average is printed at the start and the end.

    OMP_NUM_THREADS=2 nice .venv/bin/python bench/bench_index.py --sizes 100000
    OMP_NUM_THREADS=2 nice .venv/bin/python bench/bench_index.py --sizes 1000000 --alts none

Vectors and queries are ``bench_retrieval``'s: the 20k CounterFact edits' real MiniLM key embeddings
(rendered prompt and fact: 2 vectors per edit), tiled past 20k edits with seeded Gaussian noise (std
0.02 per dimension, re-normalised), and 2,000 real non-indexed queries (1,000 locality prompts, 1,000
held-out paraphrases whose own edit is known). See docs/retrieval.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import (  # noqa: E402
    N_QUERIES,
    edit_ids,
    exact_topk,
    pct,
    query_pick,
    query_texts,
    real_data,
    recall_at,
    tiled_vectors,
    timed,
)


@dataclass
class IndexRow:
    """One line of the index table."""

    kind: str
    edits: int
    vectors: int
    build_s: float
    mib: float
    p50: float
    p99: float
    recall4: float
    own4: float
    recall_para: float = 0.0  # recall@4 of the paraphrase queries alone (the rest: locality prompts)
    vs_ivf: str = ""


def index_table(rows: Sequence[IndexRow]) -> str:
    lines = ["| index | edits (vectors) | build s | memory MiB | p50 ms | p99 ms | recall@4 (paraphrases) | own@4 "
             "| p50 vs today's IVF |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.kind} | {r.edits:,} ({r.vectors:,}) | {r.build_s:.0f} | {r.mib:.0f} | {r.p50:.3f} | "
                     f"{r.p99:.2f} | {r.recall4:.3f} ({r.recall_para:.3f}) | {r.own4:.3f} | {r.vs_ivf} |")
    return "\n".join(lines)


def index_mib(index: object) -> float:
    """MiB of the FAISS index as ``write_index`` writes it (vectors, codes, graph links, id maps)."""
    import faiss

    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name) / 2**20


@dataclass
class Workload:
    """Vectors of one size, queries, and the exact answers."""

    x3: np.ndarray  # (edits, keys, dim)
    qv: np.ndarray  # (queries, dim)
    own: list[str | None]  # a paraphrase query's own edit id
    truth4: list[list[int]]

    @property
    def x(self) -> np.ndarray:
        return self.x3.reshape(-1, self.x3.shape[2])

    def quality(self, got4: list[list[str]]) -> tuple[float, float, float]:
        """recall@4, own@4, and recall@4 of the paraphrase queries alone."""
        hits = [o in g for o, g in zip(self.own, got4, strict=True) if o is not None]
        para = [i for i, o in enumerate(self.own) if o is not None]
        return (recall_at(got4, self.truth4), float(np.mean(hits)),
                recall_at([got4[i] for i in para], [self.truth4[i] for i in para]))


def workload(data: object, n_edits: int, noise: float, n_queries: int) -> Workload:
    import faiss

    texts = query_texts(data.records)  # type: ignore[attr-defined]
    order = np.column_stack([np.arange(N_QUERIES // 2), np.arange(N_QUERIES // 2, N_QUERIES)]).ravel()[:n_queries]
    qv = np.stack([data.text_vec[texts[i]] for i in order])  # type: ignore[attr-defined]
    pick = query_pick(data.records)  # type: ignore[attr-defined]
    own = [f"e{pick[i]}" if i >= N_QUERIES // 2 and pick[i] < n_edits else None for i in order]
    x3 = tiled_vectors(data, n_edits, noise)  # type: ignore[arg-type]
    faiss.omp_set_num_threads(2)
    truth4 = exact_topk(x3.reshape(-1, x3.shape[2]), x3.shape[1], qv, 4)
    return Workload(x3, qv, own, truth4)


def measure(name: str, w: Workload, search: Callable[[np.ndarray, int], list[list[str]]], build_s: float,
            mib: float, n_timed: int) -> IndexRow:
    """p50/p99 of one query at a time on 1 thread, and recall@4 / own@4 over every query."""
    import faiss

    faiss.omp_set_num_threads(1)
    for i in range(min(20, len(w.qv))):  # warm-up
        search(w.qv[i:i + 1], 4)
    ms = timed(lambda i: search(w.qv[i:i + 1], 4), min(n_timed, len(w.qv)))
    got4 = [search(w.qv[i:i + 1], 4)[0] for i in range(len(w.qv))]
    faiss.omp_set_num_threads(2)
    p50, p99 = pct(ms)
    rec, own, para = w.quality(got4)
    return IndexRow(name, w.x3.shape[0], w.x3.shape[0] * w.x3.shape[1], build_s, mib, p50, p99, rec, own, para)


def bench_kem(kind: str, w: Workload, args: argparse.Namespace, **params: object) -> tuple[IndexRow, object]:
    """kem's NamespacedIndex with ``ann_kind=kind``, filled through add_many in chunks of ``--chunk`` edits."""
    import faiss

    from kem.index import NamespacedIndex

    faiss.omp_set_num_threads(2)
    idx = NamespacedIndex(w.x3.shape[2], args.ann_threshold, ann_kind=kind, **params)  # type: ignore[arg-type]
    ids = edit_ids(len(w.x3))
    t0 = time.perf_counter()
    for lo in range(0, len(w.x3), args.chunk):  # each chunk waited for: bounded memory, as an import is
        idx.add_many("bench", ids[lo:lo + args.chunk], list(w.x3[lo:lo + args.chunk]))
        idx.wait()
    build = time.perf_counter() - t0
    part = idx._parts["bench"]
    desc = idx.describe("bench")

    row = measure(f"kem {desc}", w, kem_search(idx), build, index_mib(part.index), args.timed)
    return row, idx


def bench_raw(name: str, w: Workload, args: argparse.Namespace) -> list[IndexRow]:
    """Raw FAISS alternatives over the same vectors, built in one go (2 threads)."""
    import faiss

    x, keys, d = w.x, w.x3.shape[1], w.x3.shape[2]
    faiss.omp_set_num_threads(2)
    t0 = time.perf_counter()
    m = args.hnsw_m
    if name == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.ef_construction
        settings, knob = args.ef, "efSearch"
    elif name == "hnsw-sq8":
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.ef_construction
        index.train(x[np.random.default_rng(0).choice(len(x), min(len(x), 100_000), replace=False)])
        settings, knob = args.ef, "efSearch"
    elif name == "ivf-hnswq":  # IVF with an HNSW coarse quantizer and many lists
        nlist = int(args.ivf_hnsw_factor * len(x) ** 0.5)
        quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        index.cp.spherical, index.cp.niter, index.cp.seed = True, 10, 1234
        index.cp.max_points_per_centroid = 16
        index.train(x)
        settings, knob = args.nprobe, "nprobe"
        name = f"ivf-hnswq nlist={nlist}"
    else:
        raise ValueError(f"unknown alternative {name!r}")
    index.add(x)
    build = time.perf_counter() - t0
    mib = index_mib(index)
    rows = []
    for v in settings:
        if knob == "efSearch":
            index.hnsw.efSearch = v
        else:
            index.nprobe = v
            faiss.downcast_index(index.quantizer).hnsw.efSearch = max(2 * v, 64)

        rows.append(measure(f"raw {name} M={m} {knob}={v}" if knob == "efSearch" else f"raw {name} {knob}={v}",
                            w, raw_search(index, keys), build, mib, args.timed))
        print(index_table(rows[-1:]).splitlines()[-1], flush=True)
    del index
    return rows


def raw_search(index: object, keys: int) -> Callable[[np.ndarray, int], list[list[str]]]:
    """Top-k edits of a raw FAISS index over ``keys`` vectors per edit (as kem does: 4k+8 fetched)."""

    def search(q: np.ndarray, k: int) -> list[list[str]]:
        _, ii = index.search(q, 4 * k + 8)  # type: ignore[attr-defined]
        out = []
        for row in ii.tolist():
            seen: list[str] = []
            for i in row:
                if i >= 0 and f"e{i // keys}" not in seen:
                    seen.append(f"e{i // keys}")
            out.append(seen[:k])
        return out

    return search


def kem_search(idx: object) -> Callable[[np.ndarray, int], list[list[str]]]:
    def search(q: np.ndarray, k: int) -> list[list[str]]:
        return [[e for e, _ in row] for row in idx.search("bench", q, k)]  # type: ignore[attr-defined]

    return search


def run(args: argparse.Namespace) -> list[IndexRow]:
    data = real_data()
    rows: list[IndexRow] = []
    for n in args.sizes:
        t0 = time.perf_counter()
        w = workload(data, n, args.noise, args.queries)
        print(f"[{n:,} edits] vectors and exact top-4 of {len(w.qv)} queries in {time.perf_counter() - t0:.0f} s",
              flush=True)
        ivf_row, idx = bench_kem("ivf", w, args)
        rows.append(ivf_row)
        print(index_table(rows[-1:]).splitlines()[-1], flush=True)
        sweep_rows: list[IndexRow] = []
        part = idx._parts["bench"]  # type: ignore[attr-defined]
        for npb in args.ivf_sweep:
            part.index.nprobe = min(npb, part.index.nlist)
            r = measure(f"  kem ivf nlist={part.index.nlist} nprobe={npb}", w, kem_search(idx), ivf_row.build_s,
                        ivf_row.mib, args.timed)
            sweep_rows.append(r)
            print(index_table([r]).splitlines()[-1], flush=True)
        rows += sweep_rows
        del idx, part
        gc.collect()
        for kind in args.kinds:
            row, idx = bench_kem(kind, w, args, hnsw_max=None)  # this kind at every size (no IVF above hnsw_max)
            rows.append(row)
            print(index_table(rows[-1:]).splitlines()[-1], flush=True)
            part = idx._parts["bench"]  # type: ignore[attr-defined]
            for ef in args.ef if kind.startswith("hnsw") else []:
                part.ef_search = ef
                part.apply_params()
                r = measure(f"  kem {kind} efSearch={ef}", w, kem_search(idx), row.build_s, row.mib, args.timed)
                rows.append(r)
                print(index_table([r]).splitlines()[-1], flush=True)
            del idx, part
            gc.collect()
        for alt in args.alts:
            rows += bench_raw(alt, w, args)
            gc.collect()
        for r in rows:
            if r.edits == n:
                r.vs_ivf = f"{ivf_row.p50 / r.p50:.1f}x faster" if r.p50 < ivf_row.p50 else f"{r.p50 / ivf_row.p50:.1f}x slower"
        del w
        gc.collect()
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    def ints(s: str) -> list[int]:
        return [int(v) for v in s.split(",") if v.strip()]

    def names(s: str) -> list[str]:
        return [v for v in s.split(",") if v.strip() and v != "none"]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=ints, default=[100_000], help="edits in the namespace (2 vectors each)")
    p.add_argument("--kinds", type=names, default=["hnsw"], help="kem index kinds besides today's IVF")
    p.add_argument("--alts", type=names, default=["hnsw-sq8", "ivf-hnswq"], help="raw FAISS alternatives")
    p.add_argument("--ef", type=ints, default=[64, 128, 256], help="HNSW efSearch values to sweep")
    p.add_argument("--ivf-sweep", type=ints, default=[], help="nprobe values to sweep on today's IVF")
    p.add_argument("--nprobe", type=ints, default=[32, 64, 128], help="nprobe values for ivf-hnswq")
    p.add_argument("--ivf-hnsw-factor", type=float, default=16.0, help="ivf-hnswq lists = this x sqrt(vectors)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=None, help="raw HNSW alternatives (default: kem's)")
    p.add_argument("--queries", type=int, default=N_QUERIES, help="queries for recall (interleaved kinds)")
    p.add_argument("--timed", type=int, default=1000, help="queries timed one at a time")
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--chunk", type=int, default=50_000, help="edits per add_many call")
    p.add_argument("--ann-threshold", type=int, default=None)
    args = p.parse_args(argv)
    from kem import index as kem_index

    args.ann_threshold = args.ann_threshold or kem_index.DEFAULT_ANN_THRESHOLD
    args.ef_construction = args.ef_construction or kem_index.HNSW_EF_CONSTRUCTION
    load0 = os.getloadavg()
    print(f"load average at the start: {load0} ({os.cpu_count()} cores)", flush=True)
    t0 = time.perf_counter()
    rows = run(args)
    print()
    print(index_table(rows))
    print(f"\nload average at the start {load0}, at the end {os.getloadavg()}; {time.perf_counter() - t0:.0f} s in all; "
          f"search: 1 query at a time, k=4, faiss.omp_set_num_threads(1); builds: 2 threads")


if __name__ == "__main__":
    main()
