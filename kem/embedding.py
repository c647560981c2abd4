"""Sentence embeddings for retrieval: one embedder over three runtimes, an LRU of query vectors, and
a micro-batcher that lets concurrent single-text calls share one model call.

Backends (``Settings.embedder_backend`` / ``KEM_EMBEDDER_BACKEND``):

- ``torch``: sentence-transformers on PyTorch (the reference vectors).
- ``onnx``: the same model exported once to ONNX (:mod:`kem.onnx_export`) and run by onnxruntime with
  the fast tokenizer, no sentence-transformers in the loop: cosine >= 0.99999 to ``torch``.
- ``onnx-int8``: that graph with int8 MatMul weights (dynamic quantisation): several times faster
  per query on a CPU, vectors at cosine ~0.99 to ``torch`` (docs/retrieval.md has the scope figures).
- ``openvino``: the fp32 ONNX graph compiled by OpenVINO (``pip install openvino``).
- ``auto`` (default): ``onnx-int8`` on CPU, ``torch`` on CUDA.

Vectors of ``onnx-int8`` differ a little from the others, so that embedder has its own ``name``
(``<model>+int8``): the store keeps vectors per embedder name, and an index built with one is rebuilt
(re-embedding the keys) when the other opens it. Its activations are quantised with one scale per
model call, so a text's int8 vector depends a little on the texts it is batched with (cosine ~0.99
measured): the int8 backend embeds each query alone (the same text always gets the same vector, and
a scope decision does not depend on which requests came together); concurrent queries run in
parallel instead of in one micro-batch. The fp32 backends micro-batch (a row does not depend on its
batch-mates there: cosine >= 0.99999).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kem.models import resolve_model

if TYPE_CHECKING:
    from kem.settings import Settings

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "onnx-int8", "openvino")


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """The concrete backend for ``backend`` (``"auto"``: ``onnx-int8`` on CPU, ``torch`` elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"Settings.embedder_backend (KEM_EMBEDDER_BACKEND) must be one of "
                         f"{', '.join(BACKENDS)} (got {backend!r})")
    if backend == "auto":
        return "onnx-int8" if device == "cpu" else "torch"
    return backend


# ---- the LRU of query vectors --------------------------------------------------------------------------
class EmbeddingCache:
    """A bounded, thread-safe LRU of vectors keyed by ``(embedder key, text)``.

    An embedding depends only on the text and the model, so entries never go stale; the only policy is
    the size bound. ``hits`` / ``misses`` count look-ups (exported by ``kem serve``'s ``/metrics``).
    """

    def __init__(self, max_size: int = 4096) -> None:
        if max_size < 0:
            raise ValueError(f"EmbeddingCache.max_size must be >= 0 (got {max_size})")
        self.max_size = max_size
        self._d: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        """The cached vector (a read-only array) or None; counts a hit or a miss."""
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: Hashable, vec: np.ndarray) -> None:
        if not self.max_size:
            return
        v = np.array(vec, dtype=np.float32, copy=True)
        v.flags.writeable = False
        with self._lock:
            self._d[key] = v
            self._d.move_to_end(key)
            while len(self._d) > self.max_size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


# ---- the micro-batcher ---------------------------------------------------------------------------------
class _Slot:
    __slots__ = ("text", "vec", "error", "done")

    def __init__(self, text: str) -> None:
        self.text = text
        self.vec: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False


class MicroBatcher:
    """Concurrent single-text calls share one call of ``fn`` (a list of texts -> ``(n, dim)`` array).

    No thread of its own: the first caller to find ``fn`` idle runs it for the texts queued so far
    (the oldest ``max_batch``); callers arriving meanwhile queue and are served by the next run, led by
    one of them (a leader whose own text did not fit leads again). A lone request on an idle embedder runs at once. When the previous run served more than
    one text (requests are arriving together), the leader first waits up to ``max_wait_s`` for more.

    Args:
        fn: Embeds a list of texts.
        max_batch: Texts per call at most.
        max_wait_s: The bounded wait for company (only while requests arrive together).
    """

    def __init__(self, fn: Callable[[list[str]], np.ndarray], max_batch: int = 64, max_wait_s: float = 0.002) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._running = False
        self._last_batch = 0
        self.calls = 0  # model calls made
        self.texts = 0  # texts embedded through them

    def __call__(self, text: str) -> np.ndarray:
        slot = _Slot(text)
        with self._cond:
            self._queue.append(slot)
            if self._running:
                self._cond.notify_all()  # a leader waiting for company may have a full batch now
        while True:  # lead runs (oldest texts first) until this caller's text is done
            with self._cond:
                while self._running and not slot.done:
                    self._cond.wait()
                if slot.done:
                    return self._result(slot)
                self._running = True  # this caller leads the next run
                if self._last_batch > 1 and self.max_wait_s > 0 and len(self._queue) < self.max_batch:
                    deadline = time.monotonic() + self.max_wait_s
                    while len(self._queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            try:
                vecs = self.fn([s.text for s in batch])
                for s, v in zip(batch, vecs, strict=True):
                    s.vec = v
            except BaseException as exc:  # every caller of this run gets the error
                for s in batch:
                    s.error = exc
            with self._cond:
                for s in batch:
                    s.done = True
                self._running = False
                self._last_batch = len(batch)
                self.calls += 1
                self.texts += len(batch)
                self._cond.notify_all()

    @staticmethod
    def _result(slot: _Slot) -> np.ndarray:
        if slot.error is not None:
            raise slot.error
        assert slot.vec is not None
        return slot.vec


# ---- runtimes ------------------------------------------------------------------------------------------
class _TorchRuntime:
    """sentence-transformers on PyTorch."""

    def __init__(self, folder: Path, device: str, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer

        self.model: Any = SentenceTransformer(str(folder), device=device)
        dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else None
        self.dim = int(dim or self.model.get_sentence_embedding_dimension() or 0)
        self.batch_size = batch_size

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=show_progress).astype(np.float32, copy=False)

    encode_one_batch = encode


class _GraphRuntime:
    """The exported graph (:mod:`kem.onnx_export`) run by onnxruntime or OpenVINO, fed by the fast tokenizer.

    One model call uses one thread (the steadiest on a shared CPU, and what a single query wants); a
    bulk call sorts the texts by length (little padding), cuts them into batches of ``batch_size`` and
    runs the batches on ``threads`` threads at once (both runtimes release the GIL).
    """

    def __init__(self, folder: Path, kind: str, batch_size: int, threads: int) -> None:
        from tokenizers import Tokenizer

        meta = json.loads((folder / "meta.json").read_text())
        self.inputs: list[str] = meta["inputs"]
        self.dim = int(meta["dim"])
        self.pad_id = int(meta.get("pad_id", 0))
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=int(meta["max_seq_length"]))
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        if kind == "openvino":
            try:
                import openvino as ov
            except ImportError as exc:
                raise ImportError("KEM_EMBEDDER_BACKEND=openvino needs the openvino package: pip install openvino") from exc
            core = ov.Core()
            self._compiled = core.compile_model(core.read_model(str(folder / "model.onnx")), "CPU",
                                                {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"})
            self._run = self._run_openvino
        else:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3
            path = folder / ("model-int8.onnx" if kind == "onnx-int8" else "model.onnx")
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self._run = self._run_onnx

    def _run_onnx(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, feeds)[0]

    def _run_openvino(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        req = getattr(self._local, "req", None)
        if req is None:  # an infer request is not thread-safe: one per thread
            req = self._local.req = self._compiled.create_infer_request()
        return np.array(req.infer(feeds)[0])

    def _feeds(self, encs: Sequence[Any]) -> dict[str, np.ndarray]:
        n, width = len(encs), max(len(e.ids) for e in encs)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds

    def encode_one_batch(self, texts: list[str]) -> np.ndarray:
        """One model call for ``texts`` (as given, no sorting)."""
        return self._run(self._feeds(self.tok.encode_batch(texts))).astype(np.float32, copy=False)

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        if len(texts) <= self.batch_size:
            return self.encode_one_batch(texts)
        encs = self.tok.encode_batch(texts)
        order = np.argsort([len(e.ids) for e in encs], kind="stable")
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out = np.empty((len(texts), self.dim), dtype=np.float32)

        def run(idx: np.ndarray) -> None:
            out[idx] = self._run(self._feeds([encs[i] for i in idx]))

        from tqdm.auto import tqdm

        with tqdm(total=len(texts), desc="embedding", unit="text", disable=not show_progress) as bar:
            if self.threads == 1:
                for c in chunks:
                    run(c)
                    bar.update(len(c))
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kem-embed")
                for c, _ in zip(chunks, self._pool.map(run, chunks), strict=True):
                    bar.update(len(c))
        return out


# ---- the embedder --------------------------------------------------------------------------------------
class SentenceEmbedder:
    """:class:`~kem.protocols.Embedder` over a local sentence-transformers model.

    Single-text calls (one per request) go through an :class:`EmbeddingCache` (clients repeat prompts)
    and, on a miss, a :class:`MicroBatcher` (concurrent requests share one model call).

    Args:
        name_or_path: ``"all-minilm-l6-v2"`` (packaged) or a local model folder.
        cache_dir: kem's cache dir (the resolver's, and where the ONNX export is kept).
        device: torch device (the graph backends run on the CPU).
        backend: One of :data:`BACKENDS`.
        batch_size: Texts per model call in bulk embedding.
        lru_size: Entries of the query cache (0: none). Ignored when ``cache`` is given.
        threads: Model calls run at once in bulk embedding (graph backends; default: every core).
        cache: A cache to share between embedders (entries are keyed by :attr:`key`).
        max_wait_s: The micro-batcher's bounded wait (see :class:`MicroBatcher`).
        batch_queries: Micro-batch concurrent single queries (default: every backend but ``onnx-int8``,
            whose vectors would depend on their batch-mates; see the module docstring).
    """

    def __init__(
        self, name_or_path: str = "all-minilm-l6-v2", cache_dir: str | Path = "~/.cache/kem", device: str = "cpu",
        backend: str = "torch", batch_size: int = 64, lru_size: int = 4096, threads: int | None = None,
        cache: EmbeddingCache | None = None, max_wait_s: float = 0.002, batch_queries: bool | None = None,
    ) -> None:
        self.backend = resolve_backend(backend, device)
        self.model_name = str(name_or_path)
        self.runtime: _TorchRuntime | _GraphRuntime
        if self.backend == "torch":
            self.runtime = _TorchRuntime(resolve_model(name_or_path, cache_dir), device, batch_size)
        else:
            from kem.onnx_export import exported

            self.runtime = _GraphRuntime(exported(name_or_path, cache_dir), self.backend, batch_size,
                                         threads or os.cpu_count() or 1)
        # the vectors' identity: the store keeps embeddings per name (int8 vectors differ a little)
        self.name = self.model_name + ("+int8" if self.backend == "onnx-int8" else "")
        self.key = f"{self.model_name}/{self.backend}"
        self.dim = self.runtime.dim
        self.batch_size = batch_size
        self.cache = cache if cache is not None else EmbeddingCache(lru_size)
        self._batcher = MicroBatcher(self._encode_batch, max_batch=batch_size, max_wait_s=max_wait_s)
        self.batching = self.backend != "onnx-int8" if batch_queries is None else batch_queries
        self._torch_lock = threading.Lock()  # one torch call at a time (as before); graphs run in parallel

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        if self.backend == "torch":
            with self._torch_lock:
                return self.runtime.encode_one_batch(texts)
        return self.runtime.encode_one_batch(texts)

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embed ``texts``; returns float32, shape ``(len(texts), dim)``, rows of unit L2 norm."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) == 1:
            key = (self.key, texts[0])
            hit = self.cache.get(key)
            if hit is not None:
                return hit[None, :].copy()
            vec = self._batcher(texts[0]) if self.batching else self._encode_batch(texts)[0]
            self.cache.put(key, vec)
            return np.array(vec, dtype=np.float32)[None, :]
        if self.backend == "torch":
            with self._torch_lock:
                return self.runtime.encode(texts, show_progress)
        return self.runtime.encode(texts, show_progress)

    def stats(self) -> dict[str, float]:
        """Cache and batching counters (for metrics)."""
        return {"cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "cache_size": len(self.cache),
                "batched_calls": self._batcher.calls, "batched_texts": self._batcher.texts}


SentenceTransformerEmbedder = SentenceEmbedder  # the old name (PyTorch unless a backend is given)


def make_embedder(settings: Settings) -> SentenceEmbedder:
    """The embedder ``settings`` ask for (``embedder``, ``embedder_backend``, ``cache_dir``, ``device``)."""
    return SentenceEmbedder(settings.embedder, settings.cache_dir, device=settings.resolved_device(),
                            backend=settings.embedder_backend)
