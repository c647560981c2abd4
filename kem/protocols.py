"""The small interfaces kem's parts meet at: generator, embedder, edit store, vector index, and the two
engine capabilities ``kem serve`` looks for (forwarding to an upstream, reloading weights in place).

Each is a ``typing.Protocol`` with a handful of methods. Implementations: generators in
``kem.adapters`` (transformers, vLLM, OpenAI-compatible HTTP), the embedder in ``kem.embedding``,
stores in ``kem.stores`` (``memory``: the in-memory reference; ``sqlite``: the durable default; ``postgres``:
shared by replicas), the index in ``kem.index``.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from kem.edit import Edit, EditStatus

if TYPE_CHECKING:
    from kem.stores.services import StoreServices

Message = dict[str, Any]  # OpenAI-style chat message: {"role": "user", "content": "..."}


@dataclass(frozen=True)
class LoraRef:
    """A LoRA adapter a request runs with, by folder: engines load it on first use and keep a bounded
    number resident (a tenant's consolidated facts, ``models/tenants/<ns>/vN/adapter``).

    Attributes:
        name: A name unique to the folder's content (``alice/v3``): engines cache by it, and an upstream
            vLLM serves the adapter under it.
        path: The peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    """

    name: str
    path: str

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            from kem.errors import ValidationError

            raise ValidationError(f"an adapter needs a name and a folder (got {self.name!r}, {self.path!r})",
                                  field="adapter")


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # passed through to engines that know them
    # run with this LoRA: a name (the engine's edit-follower, in-scope requests) or a LoraRef (a folder,
    # loaded on demand: a tenant's adapter); None: base weights
    lora: str | LoraRef | None = None
    deadline: float | None = None  # time.monotonic() after which engines stop (DeadlineExceeded)
    cancel: Any = None  # a threading.Event; set: engines stop between steps (RequestCancelled)

    def check_alive(self) -> None:
        """Raise :class:`~kem.errors.RequestCancelled` / :class:`~kem.errors.DeadlineExceeded` when this
        request was cancelled or ran past its deadline (engines call it between decoding steps)."""
        if self.cancel is not None and self.cancel.is_set():
            from kem.errors import RequestCancelled

            raise RequestCancelled()
        if self.deadline is not None:
            import time

            if time.monotonic() > self.deadline:
                from kem.errors import DeadlineExceeded

                raise DeadlineExceeded("the request ran past its deadline (KEM_REQUEST_TIMEOUT) and was stopped")


@runtime_checkable
class Generator(Protocol):
    """A text generation engine. ``generate`` continues raw text; ``chat`` applies the chat template."""

    name: str

    def generate(self, prompt: str, params: GenerationParams) -> str: ...

    def chat(self, messages: Sequence[Message], params: GenerationParams) -> str: ...

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str]: ...

    def stream_chat(self, messages: Sequence[Message], params: GenerationParams) -> Iterator[str]: ...


@runtime_checkable
class AsyncGenerator(Protocol):
    """The async face of a generator (servers use it; ``kem.adapters.base.to_async`` wraps a sync one)."""

    name: str

    async def agenerate(self, prompt: str, params: GenerationParams) -> str: ...

    async def achat(self, messages: Sequence[Message], params: GenerationParams) -> str: ...

    def astream(self, prompt: str, params: GenerationParams) -> AsyncIterator[str]: ...

    def astream_chat(self, messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[str]: ...


@runtime_checkable
class ForwardingEngine(Protocol):
    """An engine kem forwards whole OpenAI request bodies to (``kem serve --upstream``;
    :class:`kem.adapters.openai_http.OpenAIHTTPGenerator`). ``kem serve`` sends out-of-scope requests
    byte-for-byte and lets the upstream decide which models it serves.

    ``forward`` returns the parsed JSON response, or with ``stream=True`` an async iterator over the
    upstream's SSE events (bytes, one event each); it raises the upstream's error with its status.
    """

    name: str

    async def forward(self, path: str, body: bytes, stream: bool = False) -> Any: ...


@runtime_checkable
class RunsLoras(Protocol):
    """An engine that runs a request with the LoRA ``GenerationParams.lora`` names, per request: the
    edit-follower's name, or a :class:`LoraRef` (a tenant's consolidated adapter, loaded on demand).
    ``accepts_loras`` may be False at run time (a vLLM started without LoRA); ask
    :func:`runs_loras`, which also looks through a sync engine's async wrapper."""

    accepts_loras: bool


def sync_engine(engine: Any) -> Any:
    """The sync engine behind ``kem.adapters.base.to_async``'s bridge (its ``sync``), else ``engine``:
    where an engine's optional members (``tokenizer``, ``follower``, ``count_tokens``...) live."""
    return getattr(engine, "sync", engine)


def runs_loras(engine: Any) -> bool:
    """Whether ``engine`` (or the sync engine behind its async bridge) runs per-request adapters now
    (:class:`RunsLoras`)."""
    engine = sync_engine(engine)
    return isinstance(engine, RunsLoras) and bool(engine.accepts_loras)


@runtime_checkable
class Reloadable(Protocol):
    """An in-process engine that loads a new model version's weights in place (vLLM), keeping its
    process, queue and compiled graphs; ``kem serve``'s ``/admin/reload`` uses it when it can."""

    def can_reload_in_place(self, model_dir: str | PathLike[str]) -> bool: ...

    def reload_weights(self, model_dir: str | PathLike[str], name: str | None = None,
                       timeout: float | None = 900) -> float: ...


@runtime_checkable
class Embedder(Protocol):
    """Sentence embedder. ``embed`` returns L2-normalised float32 rows, shape ``(len(texts), dim)``."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Change:
    """One entry of a store's append-only history."""

    seq: int  # strictly increasing over the whole store
    edit_id: str
    namespace: str
    op: str  # "add" | "update" | "delete" | "supersede" | "consolidate" | "approve" | "reject"
    at: str  # ISO timestamp
    snapshot: dict[str, Any] | None  # the edit after the change (before it, for "delete")
    actor: str | None = None  # who made the change (kem.provenance); None in rows older than the audit log

    def as_dict(self) -> dict[str, Any]:
        """The audit-log row as JSON-ready data."""
        return {"seq": self.seq, "edit_id": self.edit_id, "namespace": self.namespace, "op": self.op,
                "at": self.at, "actor": self.actor, "snapshot": self.snapshot}


@runtime_checkable
class EditStore(Protocol):
    """Durable record of edits; the source of truth. Every mutation is atomic and appends history.

    Semantics every store shares (``tests/store_conformance.py`` checks them):
    - ``add`` rejects an existing id (ConflictError). A live edit with the same namespace, subject and
      relation key (or one the caller matched in ``matches``, same namespace and subject only) is handled
      by ``on_conflict`` (:func:`kem.stores.rules.resolve`): by default it becomes ``superseded`` and the
      new edit's ``supersedes`` names it. ``pending`` edits (review) supersede only when approved.
    - Every history row records its actor (:mod:`kem.provenance`); ``audit`` reads them by namespace.
    - ``delete`` removes the edit from listings (it stays in ``history``); unknown ids raise NotFoundError.
    - Namespaces are hard boundaries: a read with a namespace never returns another namespace's edit.
    - ``revision`` increases with every change; ``changes_since(r)`` lists what happened after ``r``.
    - Embeddings are stored beside edits (per embedder name) so indexes rebuild without re-embedding.

    ``services`` says what the store offers besides edits (keys, versions, a job lock, notifications:
    :mod:`kem.stores.services`); callers ask it, never the URL. ``shared_limits()``: rate-limit buckets every
    replica on the store shares, or None (each process keeps its own).
    """

    services: StoreServices

    def shared_limits(self, lease: float = 330.0, window: float = 60.0) -> Any: ...

    def add(self, edit: Edit, embeddings: np.ndarray | None = None, embedder: str | None = None) -> Edit: ...

    def add_many(
        self, edits: Sequence[Edit], embeddings: Sequence[np.ndarray] | None = None, embedder: str | None = None,
        *, on_conflict: str = "supersede", matches: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Edit]: ...

    def live_for_subjects(self, keys: Sequence[tuple[str, str]]) -> list[Edit]: ...

    def review(self, edit_id: str, approve: bool, namespace: str | None = None, *,
               matches: Sequence[str] = (), on_conflict: str = "supersede") -> Edit: ...

    def audit(self, namespace: str | None = None, since: int = 0, limit: int | None = None) -> builtins.list[Change]: ...

    def get(self, edit_id: str, namespace: str | None = None) -> Edit: ...

    def update(self, edit_id: str, changes: dict[str, Any], namespace: str | None = None) -> Edit: ...

    def delete(self, edit_id: str, namespace: str | None = None) -> Edit: ...

    def list(
        self,
        namespace: str | None = None,
        status: EditStatus | Sequence[EditStatus] | None = None,
        limit: int | None = None,
        offset: int = 0,
        *,
        text: str | None = None,
        subject: str | None = None,
    ) -> list[Edit]:
        """Edits oldest first. ``text``: a case-insensitive substring of the id, subject, prompt, a target
        or a paraphrase (SQLite: case-insensitive for ASCII letters); ``subject``: that subject exactly
        (case-insensitive)."""
        ...

    def count(self, namespace: str | None = None, status: EditStatus | None = None, *,
              text: str | None = None, subject: str | None = None) -> int: ...

    def namespaces(self) -> builtins.list[str]: ...

    def history(self, edit_id: str, namespace: str | None = None) -> builtins.list[Change]: ...

    def revision(self) -> int: ...

    def changes_since(self, revision: int) -> builtins.list[Change]: ...

    def mark_consolidated(self, edit_ids: Sequence[str], version: str) -> None: ...

    def embeddings(self, edit_ids: Sequence[str], embedder: str) -> dict[str, np.ndarray]: ...

    def put_embeddings(self, edit_id: str, embedder: str, vectors: np.ndarray) -> None: ...

    def close(self) -> None: ...


class ChangeFeed(Protocol):
    """Keeps an edit memory's index in step with a store that announces its writes, in the background
    (:class:`kem.sync.Syncer`, set on :attr:`kem.memory.EditMemory.syncer` when ``store.services.notifications``)."""

    @property
    def healthy(self) -> bool:
        """Listening, and caught up since it last (re)connected."""
        ...

    def known_revision(self) -> int | None:
        """The store's revision as far as the feed knows without a query (None: ask the store)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ScoredEdit:
    """An edit retrieved for a request, with its scope decision.

    ``score`` is the best cosine similarity between the request and the edit's retrieval keys;
    ``subject_match`` is 1.0 when the request names the subject (:func:`kem.scope.subject_match`),
    below it the share of the subject's words present;
    ``in_scope`` is the scope classifier's verdict.
    """

    edit: Edit
    score: float
    subject_match: float = 0.0
    in_scope: bool = False
    via: str | None = None  # a chain hop: the id of the edit whose new object is this edit's subject

    def as_dict(self) -> dict[str, Any]:
        out = {
            "id": self.edit.id,
            "score": round(float(self.score), 4),
            "subject_match": round(float(self.subject_match), 3),
            "in_scope": self.in_scope,
            "subject": self.edit.subject,
            "target_new": self.edit.target_new,
        }
        if self.via is not None:
            out["via"] = self.via
        return out
