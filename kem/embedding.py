"""Sentence embeddings for retrieval (sentence-transformers, offline)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kem.models import offline, resolve_model


class SentenceTransformerEmbedder:
    """:class:`~kem.protocols.Embedder` over a local sentence-transformers model.

    Single-text calls (one per request) are memoised in a small LRU, since clients repeat prompts.

    Args:
        name_or_path: ``"all-minilm-l6-v2"`` (packaged) or a local model folder.
        cache_dir: kem's cache dir (used by the resolver).
        device: torch device.
        batch_size: Batch size for bulk embedding.
    """

    def __init__(
        self, name_or_path: str = "all-minilm-l6-v2", cache_dir: str | Path = "~/.cache/kem", device: str = "cpu",
        batch_size: int = 64, lru_size: int = 4096,
    ) -> None:
        offline()
        from sentence_transformers import SentenceTransformer

        folder = resolve_model(name_or_path, cache_dir)
        self._model: Any = SentenceTransformer(str(folder), device=device)
        self.name = str(name_or_path)
        dim = self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension") else None
        self.dim = int(dim or self._model.get_sentence_embedding_dimension() or 0)
        self.batch_size = batch_size
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lru_size = lru_size
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embed ``texts``; returns float32, shape ``(len(texts), dim)``, rows of unit L2 norm."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) == 1:
            with self._lock:
                hit = self._lru.get(texts[0])
                if hit is not None:
                    self._lru.move_to_end(texts[0])
                    return hit[None, :].copy()
        with self._lock:
            vecs = self._model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=show_progress,
            ).astype(np.float32, copy=False)
            if len(texts) == 1:
                self._lru[texts[0]] = vecs[0]
                if len(self._lru) > self._lru_size:
                    self._lru.popitem(last=False)
        return vecs
