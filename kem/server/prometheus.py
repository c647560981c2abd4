"""Prometheus metrics for ``kem serve``, written in the text exposition format (no extra dependency).

Exposed at ``/metrics``: request counts by endpoint and status, edits applied, in-scope requests,
retrieval latency (a histogram), the engine's model, and the query-embedding cache and micro-batcher
(hits, misses, model calls, texts embedded through them).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def _labels(**kv: str) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in kv.items())
    return "{" + inner + "}" if inner else ""


class Metrics:
    """Counters and one histogram, thread-safe, rendered by :meth:`render`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.edits_applied: dict[str, int] = defaultdict(int)
        self.in_scope: dict[str, int] = defaultdict(int)
        self._buckets = [0] * len(_BUCKETS)
        self._count = 0
        self._sum = 0.0
        self.reloads = 0
        self.model = ""
        self.embedder: Any = None  # an embedder with stats() (kem.embedding.SentenceEmbedder), if any

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def rewrite(self, namespace: str, seconds: float, applied: int) -> None:
        """Record one retrieval (its latency) and how many edits it applied."""
        with self._lock:
            self._count += 1
            self._sum += seconds
            for i, b in enumerate(_BUCKETS):
                if seconds <= b:
                    self._buckets[i] += 1
            if applied:
                self.edits_applied[namespace] += applied
                self.in_scope[namespace] += 1

    def render(self) -> str:
        """The metrics in Prometheus' text format (version 0.0.4)."""
        with self._lock:
            out = ["# HELP kem_requests_total HTTP requests served, by endpoint and status.",
                   "# TYPE kem_requests_total counter"]
            out += [f"kem_requests_total{_labels(endpoint=e, status=str(s))} {n}"
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP kem_edits_applied_total Edits applied to requests, by namespace.",
                    "# TYPE kem_edits_applied_total counter"]
            out += [f"kem_edits_applied_total{_labels(namespace=ns)} {n}" for ns, n in sorted(self.edits_applied.items())]
            out += ["# HELP kem_in_scope_requests_total Requests rewritten with at least one edit.",
                    "# TYPE kem_in_scope_requests_total counter"]
            out += [f"kem_in_scope_requests_total{_labels(namespace=ns)} {n}" for ns, n in sorted(self.in_scope.items())]
            out += ["# HELP kem_retrieval_seconds Time to embed the request, retrieve and decide scope.",
                    "# TYPE kem_retrieval_seconds histogram"]
            out += [f'kem_retrieval_seconds_bucket{{le="{b}"}} {n}' for b, n in zip(_BUCKETS, self._buckets, strict=True)]
            out += [f'kem_retrieval_seconds_bucket{{le="+Inf"}} {self._count}',
                    f"kem_retrieval_seconds_sum {self._sum:.6f}", f"kem_retrieval_seconds_count {self._count}"]
            out += ["# HELP kem_engine_reloads_total Hot swaps of the engine's model.",
                    "# TYPE kem_engine_reloads_total counter", f"kem_engine_reloads_total {self.reloads}",
                    "# HELP kem_engine_info The model the engine serves.", "# TYPE kem_engine_info gauge",
                    f"kem_engine_info{_labels(model=self.model)} 1"]
        out += self._embedder_lines()
        return "\n".join(out) + "\n"

    def _embedder_lines(self) -> list[str]:
        stats = getattr(self.embedder, "stats", None)
        if stats is None:
            return []
        st = stats()
        hits, misses = st.get("cache_hits", 0), st.get("cache_misses", 0)
        return [
            "# HELP kem_embedding_cache_hits_total Query embeddings served from the LRU cache.",
            "# TYPE kem_embedding_cache_hits_total counter", f"kem_embedding_cache_hits_total {hits}",
            "# HELP kem_embedding_cache_misses_total Query embeddings computed (not in the LRU cache).",
            "# TYPE kem_embedding_cache_misses_total counter", f"kem_embedding_cache_misses_total {misses}",
            "# HELP kem_embedding_cache_hit_ratio Hits / look-ups of the query-embedding cache.",
            "# TYPE kem_embedding_cache_hit_ratio gauge",
            f"kem_embedding_cache_hit_ratio {hits / (hits + misses) if hits + misses else 0.0:.6f}",
            "# HELP kem_embedding_batched_calls_total Model calls made by the query micro-batcher.",
            "# TYPE kem_embedding_batched_calls_total counter",
            f"kem_embedding_batched_calls_total {st.get('batched_calls', 0)}",
            "# HELP kem_embedding_batched_texts_total Query texts embedded through those calls.",
            "# TYPE kem_embedding_batched_texts_total counter",
            f"kem_embedding_batched_texts_total {st.get('batched_texts', 0)}",
        ]
