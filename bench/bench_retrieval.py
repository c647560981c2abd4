"""Retrieval overhead benchmark: per-request search latency, recall of the approximate index, bulk import.

Run (2 cores, the machine shared)::

    OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false nice .venv/bin/python bench/bench_retrieval.py

Real data: the 20k CounterFact edits in ``../shared/data/counterfact`` (edit + train splits), embedded
with the packaged all-MiniLM-L6-v2 (cached under ``$KEM_CACHE_DIR/bench``). Queries are the
CounterFact locality prompts (real questions that are not indexed). Past 20k edits the real key
vectors are tiled with small seeded Gaussian noise (then re-normalised), and the tiled edits get a
copy number appended to their subject; see docs/retrieval.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EMBED_THREADS = 1  # torch threads for the embedder (STACK.md: 1 thread is the steadiest on 2 shared cores)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
SPLITS = ("counterfact-edit.json", "counterfact-train.json")


@dataclass
class RealData:
    """CounterFact records and the embeddings of every text the benchmark needs."""

    records: list[dict]
    text_vec: dict[str, np.ndarray]  # text -> (384,) unit vector


def load_records(data: Path = DATA) -> list[dict]:
    """Both CounterFact splits (20k records), as dicts."""
    out: list[dict] = []
    for name in SPLITS:
        for r in json.loads((data / name).read_text()):
            out.append({**r, "split": name.split("-")[1].split(".")[0]})
    return out


def to_edit(r: dict, copy: int = 0, paraphrase: bool = True):  # noqa: ANN201 - kem.edit.Edit
    """A kem Edit for one CounterFact record (``copy > 0``: a tiled copy with a distinct subject)."""
    from kem.edit import Edit

    subject = r["subject"] if copy == 0 else f"{r['subject']} ({copy})"
    prompt = r["prompt"].replace(r["subject"], "{}", 1) if "{}" not in r["prompt"] else r["prompt"]
    return Edit(
        id=f"cf-{r['split']}-{r['case_id']}" + (f"-{copy}" if copy else ""), subject=subject, prompt=prompt,
        target_new=r["target_new"], target_true=r.get("ground_truth"),
        paraphrases=[r["rephrase_prompt"]] if paraphrase and copy == 0 else [],
        source=f"counterfact:{r['case_id']}",
    )


def cache_dir() -> Path:
    return Path(os.environ.get("KEM_CACHE_DIR", "~/.cache/kem")).expanduser() / "bench"


def make_embedder(backend: str = "torch"):  # noqa: ANN201
    import torch

    from kem.embedding import SentenceEmbedder

    torch.set_num_threads(EMBED_THREADS)
    return SentenceEmbedder(batch_size=64, backend=backend)


N_QUERIES = 2000


def query_pick(records: list[dict]) -> np.ndarray:
    return np.random.default_rng(0).choice(len(records), N_QUERIES, replace=False)


def query_texts(records: list[dict]) -> list[str]:
    """Real, non-indexed queries: locality prompts and paraphrases of the first ``N_QUERIES`` records."""
    pick = query_pick(records)
    out = [records[i]["locality_prompt"] for i in pick[: N_QUERIES // 2]]
    return out + [records[i]["rephrase_prompt"] for i in pick[N_QUERIES // 2:]]


def real_data(records: list[dict] | None = None) -> RealData:
    """Embed (once; cached) the retrieval keys of every CounterFact edit (rendered prompt and fact; the
    paraphrase is kept out of the index) and ``N_QUERIES`` real query texts."""
    records = records if records is not None else load_records()
    texts: list[str] = []
    seen: set[str] = set()
    for t in [k for r in records for k in to_edit(r, paraphrase=False).retrieval_keys()] + query_texts(records):
        if t not in seen:
            seen.add(t)
            texts.append(t)
    tag = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]
    path = cache_dir() / f"counterfact-minilm-{tag}.npy"
    if path.is_file():
        vecs = np.load(path)
    else:
        emb = make_embedder()
        t0 = time.perf_counter()
        vecs = emb.embed(texts, show_progress=True)
        dt = time.perf_counter() - t0
        print(f"embedded {len(texts)} texts in {dt:.0f} s ({len(texts) / dt:.0f} texts/s)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs)
    return RealData(records, dict(zip(texts, vecs, strict=True)))



# ---- data at scale ------------------------------------------------------------------------------------
def tiled_vectors(data: RealData, n_edits: int, noise: float, seed: int = 0) -> np.ndarray:
    """Key vectors of ``n_edits`` edits, shape ``(n_edits, 2, dim)``: the real (rendered prompt, fact)
    embeddings of CounterFact edit ``i % 20k``; copies past the first get Gaussian noise of standard
    deviation ``noise`` per dimension, then are re-normalised."""
    recs = data.records
    base = np.stack([np.stack([data.text_vec[t] for t in to_edit(r, paraphrase=False).retrieval_keys()])
                     for r in recs[: min(n_edits, len(recs))]])
    reps = -(-n_edits // len(base))
    out = np.empty((n_edits, base.shape[1], base.shape[2]), np.float32)
    rng = np.random.default_rng(seed)
    for c in range(reps):
        lo, hi = c * len(base), min(n_edits, (c + 1) * len(base))
        block = base[: hi - lo]
        if c:
            block = block + rng.standard_normal(block.shape, dtype=np.float32) * noise
            block /= np.linalg.norm(block, axis=2, keepdims=True)
        out[lo:hi] = block
    return out


def edit_ids(n: int) -> list[str]:
    return [f"e{i}" for i in range(n)]


# ---- measurement helpers ------------------------------------------------------------------------------
def timed(fn: Callable[[int], object], n: int) -> np.ndarray:
    """Milliseconds of ``fn(i)`` for ``i`` in ``range(n)``."""
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def pct(ms: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def exact_topk(x: np.ndarray, keys: int, q: np.ndarray, k: int) -> list[list[int]]:
    """Exact top-``k`` edit numbers per query (max over keys), by brute force with faiss.knn."""
    import faiss

    _, ids = faiss.knn(np.ascontiguousarray(q), x, keys * k + 8, metric=faiss.METRIC_INNER_PRODUCT)
    out = []
    for row in ids:
        seen: list[int] = []
        for i in row.tolist():
            e = i // keys
            if e not in seen:
                seen.append(e)
                if len(seen) == k:
                    break
        out.append(seen)
    return out


def recall_at(got: list[list[str]], truth: list[list[int]]) -> float:
    return float(np.mean([len({int(g[1:]) for g in gr} & set(tr)) / len(tr) for gr, tr in zip(got, truth, strict=True)]))


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class Row:
    """One line of the results table."""

    what: str
    edits: str
    p50: float | None = None
    p99: float | None = None
    ratio: str = ""
    recall: str = ""
    note: str = ""


def table(rows: Sequence[Row]) -> str:
    head = "| measurement | edits | p50 ms | p99 ms | vs baseline | recall@4 / @10 / own@4 | notes |"
    lines = [head, "|" + "---|" * 7]

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"

    for r in rows:
        lines.append(f"| {r.what} | {r.edits} | {f(r.p50)} | {f(r.p99)} | {r.ratio} | {r.recall} | {r.note} |")
    return "\n".join(lines)


# ---- the benchmark ------------------------------------------------------------------------------------
def bench_search(data: RealData, n_edits: int, args: argparse.Namespace, rows: list[Row]) -> object:
    """Index-only latency and recall at ``n_edits``; returns the built NamespacedIndex."""
    import faiss

    from kem.index import NamespacedIndex

    # locality prompts and paraphrases interleaved; a paraphrase's own edit is the record it came from
    texts = query_texts(data.records)
    order = np.column_stack([np.arange(N_QUERIES // 2), np.arange(N_QUERIES // 2, N_QUERIES)]).ravel()
    qv = np.stack([data.text_vec[texts[i]] for i in order])
    pick = query_pick(data.records)
    own = [f"e{pick[i]}" if i >= N_QUERIES // 2 else None for i in order]
    x3 = tiled_vectors(data, n_edits, args.noise)
    keys = x3.shape[1]
    x = x3.reshape(-1, x3.shape[2])
    label = f"{n_edits:,}" + (" (tiled)" if n_edits > len(data.records) else "")
    faiss.omp_set_num_threads(2)
    idx = NamespacedIndex(x.shape[1], args.ann_threshold, nprobe=args.nprobe)
    ids = edit_ids(n_edits)
    t0 = time.perf_counter()
    for lo in range(0, n_edits, args.chunk):
        idx.add_many("bench", ids[lo:lo + args.chunk], list(x3[lo:lo + args.chunk]))
    idx.wait()  # approximate indexes are built in the background
    build = time.perf_counter() - t0
    part = idx._parts["bench"]
    kind = idx.describe("bench")
    print(f"[{label}] built {kind} over {len(x):,} vectors in {build:.1f} s (add_many, chunks of {args.chunk})",
          flush=True)

    nq = min(args.queries, len(qv))
    truth4 = exact_topk(x, keys, qv[:nq], 4)  # 2 threads: a batch
    truth10 = exact_topk(x, keys, qv[:nq], 10)
    faiss.omp_set_num_threads(1)
    base_n = min(nq, args.baseline_queries if n_edits >= 100_000 else nq)
    flat_ms = timed(lambda i: faiss.knn(qv[i:i + 1], x, keys * args.k + 8, metric=faiss.METRIC_INNER_PRODUCT),
                    base_n)
    b50, b99 = pct(flat_ms)
    def quality(got4: list[list[str]], got10: list[list[str]]) -> str:
        hits = [o in g for o, g in zip(own[:nq], got4, strict=True) if o is not None]
        return f"{recall_at(got4, truth4):.3f} / {recall_at(got10, truth10):.3f} / {np.mean(hits):.3f}"

    exact_own = quality([[f"e{e}" for e in t] for t in truth4], [[f"e{e}" for e in t] for t in truth10])
    rows.append(Row("search only: exact flat baseline (1 thread)", label, b50, b99, "1.00",
                    exact_own, f"{len(x):,} vectors, {base_n} queries"))
    from kem import index as kem_index

    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        # kem runs searches of a few queries on one thread; the 2-thread row turns that off to show why
        single = kem_index.SINGLE_THREAD_QUERIES
        kem_index.SINGLE_THREAD_QUERIES = single if threads == 1 else 0
        ms = timed(lambda i: idx.search("bench", qv[i], args.k), nq)
        kem_index.SINGLE_THREAD_QUERIES = single
        p50, p99 = pct(ms)
        got4 = [[e for e, _ in r] for r in idx.search("bench", qv[:nq], 4)]
        got10 = [[e for e, _ in r] for r in idx.search("bench", qv[:nq], 10)]
        rec = quality(got4, got10)
        rows.append(Row(f"search only: kem index, {part.kind} ({threads} thread{'s' * (threads > 1)})", label,
                        p50, p99, f"{b50 / p50:.1f}x faster", rec,
                        f"{kind}; built in {build:.0f} s" if threads == 1 else ""))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    faiss.omp_set_num_threads(2)
    if part.kind == "ivf" and args.sweep:
        nlist = part.index.nlist
        for npb in args.sweep:
            part.index.nprobe = min(npb, nlist)
            faiss.omp_set_num_threads(1)
            ms = timed(lambda i: idx.search("bench", qv[i], args.k), min(nq, 300))
            got4 = [[e for e, _ in r] for r in idx.search("bench", qv[:nq], 4)]
            got10 = [[e for e, _ in r] for r in idx.search("bench", qv[:nq], 10)]
            p50, p99 = pct(ms)
            rows.append(Row(f"  nprobe sweep: ivf nprobe={npb}", label, p50, p99, f"{b50 / p50:.1f}x faster",
                            quality(got4, got10), f"nlist={nlist}"))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        part.index.nprobe = min(args.nprobe, nlist)
        faiss.omp_set_num_threads(2)
    if n_edits in args.hnsw_sizes:
        bench_alt("hnsw", x, keys, qv[:nq], quality, b50, label, args, rows)
    if part.kind == "ivf" and args.alt_nlist_factor and n_edits in args.alt_sizes:
        bench_alt("ivf", x, keys, qv[:nq], quality, b50, label, args, rows)
    return idx


def bench_alt(kind: str, x: np.ndarray, keys: int, qv: np.ndarray, quality: Callable[..., str], b50: float,
              label: str, args: argparse.Namespace, rows: list[Row]) -> None:
    """Alternatives over the same vectors, built in one go: HNSW (M=32, efConstruction=40, the type
    kem used before), or an IVF trained once on everything with ``--alt-nlist-factor * sqrt(n)`` lists."""
    import faiss

    from kem.index import _Partition

    faiss.omp_set_num_threads(2)
    t0 = time.perf_counter()
    if kind == "hnsw":
        h = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        h.hnsw.efConstruction = 40
        settings = [64, 128]
    else:
        nlist = int(args.alt_nlist_factor * len(x) ** 0.5)
        h = _Partition(x.shape[1])._new_ivf(x, nlist)
        settings = args.sweep
    h.add(x)
    build = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)

    def edits(q: np.ndarray, k: int) -> list[list[str]]:
        _, ii = h.search(q, keys * k + 8)
        out = []
        for row in ii.tolist():
            seen: list[str] = []
            for i in row:
                if i >= 0 and f"e{i // keys}" not in seen:
                    seen.append(f"e{i // keys}")
            out.append(seen[:k])
        return out

    for v in settings:
        if kind == "hnsw":
            h.hnsw.efSearch = v
            what = f"  alternative: HNSW M=32 efSearch={v} (1 thread)"
        else:
            h.nprobe = v
            what = f"  alternative: IVF nlist={h.nlist} (trained once) nprobe={v}"
        ms = timed(lambda i: h.search(qv[i:i + 1], keys * args.k + 8), min(len(qv), 500))
        p50, p99 = pct(ms)
        rows.append(Row(what, label, p50, p99, f"{b50 / p50:.1f}x faster", quality(edits(qv, 4), edits(qv, 10)),
                        f"built in {build:.0f} s"))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    faiss.omp_set_num_threads(2)


class TableEmbedder:
    """An embedder that returns precomputed vectors (to time the store + index part of an import)."""

    def __init__(self, text_vec: dict[str, np.ndarray], name: str) -> None:
        self.text_vec, self.name = text_vec, name
        self.dim = len(next(iter(text_vec.values())))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.text_vec[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def bench_full_path(data: RealData, n_edits: int, idx: object, embedder: object, args: argparse.Namespace,
                    rows: list[Row], search_row: Row) -> None:
    """embed + EditMemory.search (SQLite store of ``n_edits`` edits) + scope decision, per request."""
    import faiss

    from kem.memory import EditMemory
    from kem.scope import ScopeClassifier
    from kem.stores.sqlite import SQLiteStore

    label = f"{n_edits:,}" + (" (tiled)" if n_edits > len(data.records) else "")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = SQLiteStore(Path(tmp) / "edits.db")
        t0 = time.perf_counter()
        recs = data.records
        for lo in range(0, n_edits, 20_000):
            batch = [to_edit(recs[i % len(recs)], i // len(recs), paraphrase=False).model_copy(update={"id": f"e{i}"})
                     for i in range(lo, min(n_edits, lo + 20_000))]
            store.add_many([e.model_copy(update={"namespace": "bench"}) for e in batch])
        print(f"[{label}] SQLite store of {n_edits:,} edits written in {time.perf_counter() - t0:.0f} s", flush=True)
        idx.revision = store.revision()  # type: ignore[attr-defined]
        idx.save(Path(tmp) / "index", {"embedder": embedder.name})  # type: ignore[attr-defined]
        memory = EditMemory(store, embedder, Path(tmp) / "index", args.ann_threshold)  # type: ignore[arg-type]
        assert len(memory.index) == n_edits, "EditMemory rebuilt the index instead of loading it"
        scope = ScopeClassifier()
        texts = query_texts(data.records)
        nq = min(args.full_queries, len(texts))
        for t in ("warm-up query one", "warm-up query two"):
            scope.decide(t, memory.search(t, "bench", args.k))
        embedder.cache.clear()  # type: ignore[attr-defined]  # the embedder memoises single texts: time real work
        faiss.omp_set_num_threads(1)
        ms = timed(lambda i: scope.decide(texts[i], memory.search(texts[i], "bench", args.k)), nq)
        faiss.omp_set_num_threads(2)
        p50, p99 = pct(ms)
        rows.append(Row("full request: embed + search + store.get + scope", label, p50, p99,
                        f"search is {100 * (search_row.p50 or 0) / p50:.1f}% of p50", "",
                        f"SQLite, k={args.k}, {nq} distinct queries"))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        store.close()


def bench_import(data: RealData, embedder: object, args: argparse.Namespace, rows: list[Row]) -> None:
    """Bulk import into a fresh SQLite store through EditMemory.add_many: total, embedding, store, index."""
    from kem.memory import EditMemory
    from kem.stores.sqlite import SQLiteStore

    recs = data.records
    # (a) the real path, real embedder, on the first edits
    n = args.import_embedded
    edits = [to_edit(r, paraphrase=False) for r in recs[:n]]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        memory = EditMemory(SQLiteStore(Path(tmp) / "edits.db"), embedder, Path(tmp) / "index")  # type: ignore[arg-type]
        t0 = time.perf_counter()
        memory.add_many(edits)
        memory.save()
        total = time.perf_counter() - t0
    texts = [t for e in edits for t in e.retrieval_keys()]
    t0 = time.perf_counter()
    embedder.embed(texts)  # type: ignore[attr-defined]
    emb = time.perf_counter() - t0
    rows.append(Row("bulk import, real embedder (EditMemory.add_many)", f"{n:,}", note=(
        f"**{n / total:.0f} edits/s** ({len(texts) / n:.0f} keys/edit); embedding alone {len(texts) / emb:.0f} "
        f"sentences/s = {n / emb:.0f} edits/s ({EMBED_THREADS} torch thread, batch 64)")))
    print(rows[-1].note, flush=True)
    # (b) store + index only: precomputed embeddings, all 20k edits
    edits = [to_edit(r, paraphrase=False) for r in recs]
    table_emb = TableEmbedder(data.text_vec, embedder.name)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = SQLiteStore(Path(tmp) / "edits.db")
        memory = EditMemory(store, table_emb, Path(tmp) / "index")  # type: ignore[arg-type]
        t0 = time.perf_counter()
        vecs = memory.embed_edits(edits)
        t1 = time.perf_counter()
        store.add_many(edits, vecs, table_emb.name)
        t2 = time.perf_counter()
        memory.sync()
        t3 = time.perf_counter()
        memory.save()
        t4 = time.perf_counter()
        kind = memory.index.kind("default")
    n = len(edits)
    rows.append(Row("bulk import, store + index only (precomputed vectors)", f"{n:,}", note=(
        f"**{n / (t4 - t0):.0f} edits/s**: SQLite write {n / (t2 - t1):.0f}/s, index sync {n / (t3 - t2):.0f}/s "
        f"(ends as {kind}), index save {t4 - t3:.1f} s")))
    print(rows[-1].note, flush=True)


# ---- the embedder: old path (sentence-transformers on torch) vs new (kem's default backend) ----------
def _p50_interleaved(fns: dict[str, Callable[[str], object]], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Milliseconds per call of each ``fns[name](text)``, the backends taking turns on each text so
    that load on a shared machine falls on all of them alike."""
    out: dict[str, list[float]] = {n: [] for n in fns}
    for i, t in enumerate(texts):
        names = list(fns)
        for n in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[n](t)
            out[n].append((time.perf_counter() - t0) * 1e3)
    return {n: np.array(v) for n, v in out.items()}


def bench_embedders(args: argparse.Namespace) -> None:
    """Query embedding, the full fast path in scope and bulk import with embedding: the old torch path
    against the new backend (and the other backends), in one run, with the load average."""
    import torch

    from kem.embedding import SentenceEmbedder, resolve_backend
    from kem.memory import EditMemory
    from kem.scope import ScopeClassifier
    from kem.stores.sqlite import SQLiteStore

    new_b = resolve_backend(args.new_backend, "cpu")
    others = [b for b in ("onnx", "onnx-int8", "openvino") if b != new_b]
    print(f"load average at the start: {os.getloadavg()} ({os.cpu_count()} cores)", flush=True)
    t_all = time.perf_counter()
    records = load_records()
    embs = {"torch": SentenceEmbedder(backend="torch", lru_size=0), new_b: SentenceEmbedder(backend=new_b, lru_size=0)}
    for b in others:
        try:
            embs[b] = SentenceEmbedder(backend=b, lru_size=0)
        except ImportError as exc:
            print(f"({b} skipped: {exc})")
    lines = ["| measurement | old: torch | new: " + new_b + " | new vs old | " + " | ".join(b for b in embs
             if b not in ("torch", new_b)) + " | notes |", "|---" * (5 + len(embs) - 2) + "|"]

    def row(what: str, vals: dict[str, float], fmt: str, ratio: str, note: str) -> None:
        rest = " | ".join(fmt.format(vals[b]) if b in vals else "" for b in embs if b not in ("torch", new_b))
        lines.append(f"| {what} | {fmt.format(vals['torch'])} | {fmt.format(vals[new_b])} | {ratio} | {rest} | {note} |")
        print(lines[-1], flush=True)

    # 1. one short query (the old path as kem ran it in the benchmarks: 1 torch thread)
    torch.set_num_threads(EMBED_THREADS)
    queries = [r["rephrase_prompt"] for r in records[10_000:10_000 + args.embed_queries]]
    for e in embs.values():
        for q in ("warm-up one", "warm-up two", "warm-up three"):
            e.embed([q])
    ms = _p50_interleaved({b: (lambda t, e=e: e.embed([t])) for b, e in embs.items()}, queries)  # type: ignore[misc]
    p50 = {b: float(np.percentile(v, 50)) for b, v in ms.items()}
    row("query embedding, 1 short query, p50 ms", p50, "{:.2f}", f"**{p50['torch'] / p50[new_b]:.1f}x faster**",
        f"{len(queries)} CounterFact paraphrases, cache off; p99 old {np.percentile(ms['torch'], 99):.1f} / "
        f"new {np.percentile(ms[new_b], 99):.1f} ms")

    # 2. bulk import of CounterFact edits with embedding (new path, batched) and a plain encode of their keys
    n = args.embed_import
    edits = [to_edit(r, paraphrase=False) for r in records[:n]]
    keys = [k for e in edits for k in e.retrieval_keys()]
    st_times = {}
    for threads in sorted({1, os.cpu_count() or 1}):  # the baseline: the faster of 1 thread and every core
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        embs["torch"].runtime.encode(keys)
        st_times[threads] = time.perf_counter() - t0
        print(f"plain sentence-transformers encode of {len(keys):,} keys: {st_times[threads]:.1f} s "
              f"({len(keys) / st_times[threads]:.0f}/s, {threads} torch threads, batch 64)", flush=True)
    st_threads = min(st_times, key=st_times.__getitem__)
    st_s = st_times[st_threads]
    torch.set_num_threads(st_threads)  # the old import path runs as fast as torch can here
    tmp = tempfile.mkdtemp(dir=args.tmp, prefix="bench-embed-")
    store = SQLiteStore(Path(tmp) / "new.sqlite")
    memory = EditMemory(store, embs[new_b], Path(tmp) / "new-index")
    t0 = time.perf_counter()
    memory.add_many(edits, batch_size=1000, progress=True)
    memory.save()
    new_s = time.perf_counter() - t0
    imp = {"torch": float("nan"), new_b: n / new_s}
    old_note = "old path not run"
    if not args.no_old_import:
        old_store = SQLiteStore(Path(tmp) / "old.sqlite")
        old_mem = EditMemory(old_store, embs["torch"], Path(tmp) / "old-index")
        t0 = time.perf_counter()
        old_mem.add_many(edits, progress=True)  # the old path: embed everything, then one transaction
        old_mem.save()
        old_s = time.perf_counter() - t0
        imp["torch"] = n / old_s
        old_note = f"old path {old_s:.0f} s"
        old_store.close()
    torch.set_num_threads(EMBED_THREADS)
    row(f"bulk import with embedding, {n:,} CounterFact edits, edits/s", imp, "{:.0f}",
        f"**{new_s / st_s:.2f}x the time of a plain ST encode** of the same {len(keys):,} keys ({st_s:.0f} s, "
        f"{st_threads} thread{'s' * (st_threads > 1)}, the faster of 1 and {os.cpu_count()})",
        f"EditMemory.add_many into SQLite + index save; new: batches of 1000, {new_s:.0f} s; {old_note}")

    # 3. the full fast path, in scope: embed + EditMemory.search (SQLite, the n edits) + scope decision
    scope = ScopeClassifier()
    in_scope = [r["rephrase_prompt"] for r in records[: min(n, args.embed_queries)]]
    for q in in_scope[:3]:
        memory.search(q, "default", args.k)

    def full(e: object) -> Callable[[str], object]:
        def go(t: str) -> object:
            qv = e.embed([t])[0]  # type: ignore[attr-defined]
            return scope.decide(t, memory.search(t, "default", args.k, query_vec=qv))
        return go

    ms = _p50_interleaved({b: full(e) for b, e in embs.items()}, in_scope)
    p50 = {b: float(np.percentile(v, 50)) for b, v in ms.items()}
    applied = sum(any(s.in_scope for s in full(embs[new_b])(t)) for t in in_scope)  # type: ignore[attr-defined]
    row("full fast path, in scope (embed + search + store.get + scope), p50 ms", p50, "{:.2f}",
        f"**{p50['torch'] / p50[new_b]:.1f}x faster**",
        f"{n:,} edits in SQLite, k={args.k}, {len(in_scope)} paraphrases of stored edits "
        f"({applied} got an edit in scope); index and store built by the new path, only the query embedder differs")
    store.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("\n".join(lines))
    print(f"\nload average at the end: {os.getloadavg()}; {time.perf_counter() - t_all:.0f} s in all")


def main(argv: Sequence[str] | None = None) -> None:
    def ints(s: str) -> list[int]:
        return [int(v) for v in s.split(",") if v.strip()]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="only embed and cache the CounterFact texts")
    p.add_argument("--sizes", type=ints, default=[1000, 20_000, 100_000, 1_000_000])
    p.add_argument("--full-sizes", type=ints, default=None,
                   help="sizes that also get the full per-request path with a SQLite store (default: --sizes)")
    p.add_argument("--hnsw-sizes", type=ints, default=[20_000, 100_000])
    p.add_argument("--sweep", type=ints, default=[16, 32, 128, 256], help="nprobe values to try besides the default")
    p.add_argument("--k", type=int, default=4, help="edits retrieved per request (kem's default top_k)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--baseline-queries", type=int, default=100, help="exact-search queries from 100k edits")
    p.add_argument("--alt-nlist-factor", type=float, default=8.0, help="also try an IVF with this many x sqrt(n) lists")
    p.add_argument("--alt-sizes", type=ints, default=[20_000, 100_000], help="sizes that get that IVF")
    p.add_argument("--full-queries", type=int, default=200)
    p.add_argument("--import-embedded", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.02, help="per-dimension std of the noise on tiled copies")
    p.add_argument("--chunk", type=int, default=50_000, help="edits per add_many call when building")
    p.add_argument("--ann-threshold", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--tmp", default=None, help="folder for the temporary SQLite stores")
    p.add_argument("--no-import", action="store_true")
    p.add_argument("--backend", default="torch", help="embedder backend of the full-request and import rows")
    p.add_argument("--embedders", action="store_true",
                   help="only the embedder section: old (torch) vs new (--new-backend) path, in one run")
    p.add_argument("--new-backend", default="auto", help="the new path's backend in --embedders (auto: kem's default)")
    p.add_argument("--embed-queries", type=int, default=300, help="--embedders: single queries timed per backend")
    p.add_argument("--embed-import", type=int, default=10_000, help="--embedders: CounterFact edits imported")
    p.add_argument("--no-old-import", action="store_true", help="--embedders: skip the old path's import")
    p.add_argument("--index-sizes", type=ints, default=[],
                   help="only the big-partition index table (bench_index.py) at these sizes, in vectors, on the "
                        "realistic data set, e.g. 1000000")
    a = p.parse_args(argv)
    from kem import index as kem_index

    a.nprobe = a.nprobe or kem_index.DEFAULT_NPROBE
    a.ann_threshold = a.ann_threshold or kem_index.DEFAULT_ANN_THRESHOLD
    a.full_sizes = a.sizes if a.full_sizes is None else a.full_sizes
    if a.embedders:
        bench_embedders(a)
        return
    if a.index_sizes:
        import bench_index

        for n in a.index_sizes:
            bench_index.main(["--n", str(n), "--data", "realistic"])
        return
    data = real_data()
    if a.prepare:
        print(len(data.records), len(data.text_vec))
        return
    embedder = make_embedder(a.backend)
    rows: list[Row] = []
    print(f"load average at the start: {os.getloadavg()} ({os.cpu_count()} cores)", flush=True)
    t_all = time.perf_counter()
    sizes = sorted(set(a.sizes) | ({len(data.records)} & set(a.hnsw_sizes)))
    for n in sizes:
        idx = bench_search(data, n, a, rows)
        if n in a.full_sizes:
            search_row = next(r for r in reversed(rows) if r.what.startswith("search only: kem index")
                              and "1 thread" in r.what)
            bench_full_path(data, n, idx, embedder, a, rows, search_row)
        del idx
        gc.collect()
    if not a.no_import:
        bench_import(data, embedder, a, rows)
    print()
    print(table(rows))
    print(f"\nload average at the end: {os.getloadavg()}")
    print(f"\nqueries: {N_QUERIES} real CounterFact texts (locality prompts and held-out paraphrases), not indexed; "
          f"2 keys per edit (rendered prompt, fact); tiled copies: noise std {a.noise}/dim; "
          f"ann_threshold={a.ann_threshold} vectors, nprobe={a.nprobe}; peak RSS {rss_gib():.1f} GiB; "
          f"{time.perf_counter() - t_all:.0f} s in all")


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
