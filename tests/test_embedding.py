"""The embedder backends (torch, ONNX fp32, ONNX int8), the query cache, the micro-batcher, and bulk import
in batches (one transaction each) — on the packaged MiniLM, real onnxruntime and a real SQLite store."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kem.edit import Edit
from kem.embedding import EmbeddingCache, MicroBatcher, SentenceEmbedder, resolve_backend
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def texts() -> list[str]:
    recs = json.loads(Path(shared_data("counterfact", "counterfact-train.json")).read_text())[:40]
    return [r["prompt"].replace("{}", r["subject"]) for r in recs] + [r["locality_prompt"] for r in recs[:20]]


@pytest.fixture(scope="module")
def torch_emb(kem_settings):
    return SentenceEmbedder(kem_settings.embedder, kem_settings.cache_dir, backend="torch")


@pytest.fixture(scope="module")
def onnx_emb(kem_settings):
    return SentenceEmbedder(kem_settings.embedder, kem_settings.cache_dir, backend="onnx")


@pytest.fixture(scope="module")
def int8_emb(kem_settings):
    return SentenceEmbedder(kem_settings.embedder, kem_settings.cache_dir, backend="onnx-int8")


def test_backend_selection_and_errors(monkeypatch):
    from pydantic import ValidationError

    from kem.settings import Settings

    assert resolve_backend("auto", "cpu") == "onnx-int8"
    assert resolve_backend("auto", "cuda:0") == "torch"
    assert resolve_backend("onnx") == "onnx"
    with pytest.raises(ValueError, match="embedder_backend.*'tensorflow'"):
        resolve_backend("tensorflow")
    with pytest.raises(ValueError, match="embedder_backend.*'tensorflow'"):
        SentenceEmbedder(backend="tensorflow")
    monkeypatch.setenv("KEM_EMBEDDER_BACKEND", "onnx")
    assert Settings().embedder_backend == "onnx"
    monkeypatch.setenv("KEM_EMBEDDER_BACKEND", "tensorflow")
    with pytest.raises(ValidationError, match="embedder_backend"):
        Settings()


def test_onnx_vectors_match_torch(torch_emb, onnx_emb, int8_emb, texts):
    ref = torch_emb.embed(texts)
    fp32, int8 = onnx_emb.embed(texts), int8_emb.embed(texts)
    assert fp32.shape == int8.shape == ref.shape and fp32.dtype == int8.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fp32, axis=1), 1.0, atol=1e-5)
    assert (fp32 * ref).sum(1).min() >= 0.9999  # the same vectors
    cos8 = (int8 * ref).sum(1)
    assert cos8.min() >= 0.97 and cos8.mean() >= 0.99  # close; measured ~0.982 min / 0.993 mean on CounterFact
    # one text alone (the query path) gives the batch's vector
    one = onnx_emb.embed(texts[3:4])[0]
    assert float(one @ ref[3]) >= 0.9999
    # vectors that differ carry another name (the store keeps vectors per embedder name)
    assert onnx_emb.name == torch_emb.name != int8_emb.name
    # int8 queries are embedded alone (their vectors would depend on batch-mates): deterministic
    assert onnx_emb.batching and not int8_emb.batching
    assert np.array_equal(int8_emb.embed(texts[5:6]), int8_emb.runtime.encode_one_batch(texts[5:6]))


def test_export_is_cached(kem_settings, onnx_emb):
    from kem.onnx_export import exported

    folder = exported(kem_settings.embedder, kem_settings.cache_dir)
    before = (folder / "model.onnx").stat().st_mtime_ns
    assert exported(kem_settings.embedder, kem_settings.cache_dir) == folder
    assert (folder / "model.onnx").stat().st_mtime_ns == before  # not exported again
    assert {"model.onnx", "model-int8.onnx", "tokenizer.json", "meta.json"} <= {p.name for p in folder.iterdir()}


def test_cache_returns_identical_vectors_and_counts_hits(kem_settings, onnx_emb):
    cache = EmbeddingCache(max_size=2)
    e = SentenceEmbedder(kem_settings.embedder, kem_settings.cache_dir, backend="onnx", cache=cache)
    a = e.embed(["The capital of France is"])
    assert (cache.hits, cache.misses) == (0, 1)
    b = e.embed(["The capital of France is"])
    assert np.array_equal(a, b) and (cache.hits, cache.misses) == (1, 1)
    b[0, 0] = 42.0  # callers get copies: the cached vector stays
    assert np.array_equal(e.embed(["The capital of France is"]), a) and cache.hits == 2
    e.embed(["one"])
    e.embed(["two"])  # evicts the least recently used ("The capital..." was used before "one")
    assert len(cache) == 2 and cache.get((e.key, "The capital of France is")) is None
    # the key names the backend: an int8 embedder sharing the cache does not get fp32 vectors
    e8 = SentenceEmbedder(kem_settings.embedder, kem_settings.cache_dir, backend="onnx-int8", cache=cache)
    hits = cache.hits
    e8.embed(["two"])
    assert cache.hits == hits
    assert e.stats()["cache_hits"] == cache.hits
    with pytest.raises(ValueError, match="max_size"):
        EmbeddingCache(-1)


def test_micro_batcher_gives_each_caller_its_row(onnx_emb, texts):
    calls: list[int] = []

    def slow(batch: list[str]) -> np.ndarray:  # the real model, slowed so that callers overlap
        calls.append(len(batch))
        time.sleep(0.05)
        return onnx_emb.runtime.encode_one_batch(batch)

    mb = MicroBatcher(slow, max_batch=4, max_wait_s=0.002)
    n = 24  # more waiting callers than a batch holds: leaders whose text did not fit lead again
    out: dict[int, np.ndarray] = {}
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        out[i] = mb(texts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == n
    ref = onnx_emb.embed(texts[:n])
    for i in range(n):
        assert float(out[i] @ ref[i]) >= 0.9999, i  # its own text's vector, not a neighbour's
    assert sum(calls) == n and len(calls) < n and max(calls) <= 4  # shared calls, bounded size
    assert (mb.calls, mb.texts) == (len(calls), n)

    # an error reaches every caller of the failed call, and the batcher keeps working
    def boom(batch: list[str]) -> np.ndarray:
        raise RuntimeError("model failed")

    bad = MicroBatcher(boom)
    with pytest.raises(RuntimeError, match="model failed"):
        bad("x")
    bad.fn = onnx_emb.runtime.encode_one_batch
    assert bad("x").shape == (onnx_emb.dim,)


def test_metrics_expose_the_cache(onnx_emb):
    from kem.server.prometheus import Metrics

    m = Metrics()
    m.embedder = onnx_emb
    onnx_emb.embed(["metrics probe"])
    onnx_emb.embed(["metrics probe"])
    text = m.render()
    assert f"kem_embedding_cache_hits_total {onnx_emb.cache.hits}" in text
    assert "kem_embedding_cache_hit_ratio" in text and "kem_embedding_batched_calls_total" in text


def _edits(n: int, start: int = 0) -> list[Edit]:
    return [Edit(id=f"bulk-{i}", subject=f"Widget {i}", prompt="The maker of {} is", target_new=f"Maker {i}")
            for i in range(start, start + n)]


def test_bulk_import_one_transaction_per_batch(tmp_path, onnx_emb):
    from kem.memory import EditMemory
    from kem.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "edits.sqlite")
    memory = EditMemory(store, onnx_emb, tmp_path / "index")
    writes: list[int] = []
    real_add = store.add_many

    def counting_add(edits, vecs=None, embedder=None, **kw):  # the real store, its calls counted
        writes.append(len(edits))
        return real_add(edits, vecs, embedder, **kw)

    store.add_many = counting_add  # type: ignore[method-assign]
    stored = memory.add_many(_edits(25), batch_size=10)
    assert writes == [10, 10, 5] and [e.id for e in stored] == [f"bulk-{i}" for i in range(25)]
    assert store.count() == 25 and len(memory.index) == 25
    assert store.embeddings(["bulk-24"], onnx_emb.name)["bulk-24"].shape == (2, onnx_emb.dim)
    hit = memory.search("The maker of Widget 17 is", "default", 1)[0][0]
    assert hit.id == "bulk-17"

    # a batch that fails (an id already stored) leaves the earlier batches in, itself and later ones out
    writes.clear()
    batch = _edits(10, 100) + _edits(9, 200) + _edits(1, 3) + _edits(10, 300)  # bulk-3 exists: batch 2 fails
    from kem.errors import ConflictError

    with pytest.raises(ConflictError) as err:
        memory.add_many(batch, batch_size=10)
    assert "10 edits in 1 earlier batches" in " ".join(getattr(err.value, "__notes__", []))
    assert writes == [10, 10]  # the third batch was never written
    assert store.count() == 35
    for i in (100, 109):
        assert store.get(f"bulk-{i}").id == f"bulk-{i}"
        assert memory.index.contains("default", f"bulk-{i}")
    for i in (200, 208, 300, 309):
        with pytest.raises(KeyError):
            store.get(f"bulk-{i}")
    # batch_size=None keeps one transaction: all or nothing
    with pytest.raises(ConflictError):
        memory.add_many(_edits(5, 400) + _edits(1, 0))
    assert store.count() == 35
    store.close()
