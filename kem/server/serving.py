"""The serving logic, with no web framework in it: OpenAI requests in, rewritten requests to the engine,
OpenAI responses (or SSE event streams) out.

Two kinds of engine:

* a *local* engine (anything with the async generator methods, or a sync
  :class:`~kem.protocols.Generator` bridged by :func:`kem.adapters.base.to_async`): kem builds the
  OpenAI response from the generated text;
* an *HTTP* engine (has ``forward``, e.g. :class:`kem.adapters.openai_http.OpenAIHTTPGenerator`):
  kem forwards the request body. Out-of-scope requests go out byte-for-byte as they came in (only a
  ``model`` alias such as ``default`` is mapped to the upstream's name); in-scope ones get their
  ``messages`` / ``prompt`` rewritten and kem's stop strings added. Streams pass through event by event.

Every response carries a ``kem`` field (the applied edits); :attr:`Result.applied` feeds the
``x-kem-edits`` header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from kem.adapters.base import to_async
from kem.editor import KnowledgeEditor, Rewrite
from kem.errors import EngineError, KemError, NotFoundError
from kem.protocols import GenerationParams, ScoredEdit
from kem.server.metrics import Metrics
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
    error_body,
    kem_error_body,
    new_id,
    now,
)

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


@dataclass
class Result:
    """What a serving call returns: a JSON body, or an SSE byte stream (``stream`` set)."""

    applied: list[ScoredEdit] = field(default_factory=list)
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
    namespace: str | None = None

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
    tok = getattr(getattr(engine, "sync", engine), "tokenizer", None)
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
        engine: A local generator (sync or async) or an HTTP engine with ``forward``.
        served_name: The model name clients use (``default`` also works).
        metrics: Where counters go.
        default_max_tokens: Generation length when a request gives none (local engines).
    """

    def __init__(self, editor: KnowledgeEditor, engine: Any, *, served_name: str | None = None,
                 metrics: Metrics | None = None, default_max_tokens: int | None = None) -> None:
        self.editor = editor
        self.metrics = metrics or Metrics()
        self.default_max_tokens = default_max_tokens or editor.settings.max_new_tokens
        self._engine: Any = None
        self.served_name = ""
        self.set_engine(engine, served_name)

    # ---- the engine and hot swap ----------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        return self._engine

    def set_engine(self, engine: Any, served_name: str | None = None) -> None:
        """Switch to ``engine`` atomically: requests already running finish on the old one, new requests
        take the new one (one reference assignment)."""
        engine = engine if hasattr(engine, "forward") else to_async(engine)
        self.served_name = served_name or self.served_name or engine.name
        self._engine = engine
        self.metrics.model = engine.name

    def swap(self, engine: Any, absorbed_versions: frozenset[str] | None = None) -> Any:
        """Hot swap to a new model version's engine and from then on skip the edits it absorbed.
        Returns the old engine (the caller closes it once its running requests are done)."""
        old = self._engine
        if absorbed_versions is not None:
            self.editor.absorbed_versions = frozenset(absorbed_versions)
        self.set_engine(engine, self.served_name)
        self.metrics.reloads += 1
        log.info("engine swapped to %s (absorbed versions: %s)", engine.name,
                 sorted(self.editor.absorbed_versions))
        return getattr(old, "sync", old)

    def models(self) -> ModelList:
        root = self._engine.name
        return ModelList(data=[ModelCard(id=self.served_name, root=root), ModelCard(id="default", root=root)])

    def _check_model(self, model: str) -> str:
        """The engine-side name for ``model``; 404 for a model kem does not serve."""
        if model in ("default", self.served_name, self._engine.name, ""):
            return self._engine.name
        if hasattr(self._engine, "forward"):  # the upstream may serve more models (LoRA adapters...): it decides
            return model
        raise _ModelNotFound(f"model {model!r} is not served here; use {self.served_name!r} or 'default' "
                             "(GET /v1/models lists them)")

    # ---- the fast path ----------------------------------------------------------------------------------
    async def _rewrite(self, fn: Callable[..., Rewrite], request: Any, namespace: str, engine: Any) -> Rewrite:
        t0 = time.perf_counter()
        rw = await asyncio.to_thread(fn, request, namespace, self.editor.follower_of(engine))
        self.metrics.rewrite(namespace, time.perf_counter() - t0, len(rw.applied))
        return rw

    def _params(self, req: ChatCompletionRequest | CompletionRequest, extra_stop: tuple[str, ...],
                adapter: str | None = None) -> GenerationParams:
        stop = tuple(dict.fromkeys(req.stop_list() + extra_stop))
        return GenerationParams(
            max_new_tokens=req.token_limit() or self.default_max_tokens,
            temperature=req.temperature if req.temperature is not None else 0.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            stop=stop, extra=dict(req.model_extra or {}), adapter=adapter,
        )

    # ---- chat -------------------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: bytes, namespace: str) -> Result:
        """Serve one chat completion request (``raw`` is the body as received, for pass-through)."""
        engine = self._engine
        upstream_model = self._check_model(req.model)
        rw = await self._rewrite(self.editor.rewrite_chat, req.messages, namespace, engine)
        info = kem_info(rw.applied, namespace)
        if hasattr(engine, "forward"):
            body = _forward_body(raw, req, upstream_model, "messages", rw)
            return await self._forward(engine, "/v1/chat/completions", body, req.stream, rw, info)
        params = self._params(req, rw.stop, rw.adapter)
        if not req.stream:
            text = await engine.achat(rw.request, params)
            resp = ChatCompletionResponse(model=self.served_name, kem=info, choices=[ChatChoice(
                message=ChatMessageOut(content=text), finish_reason=finish_reason(engine, text, params))])
            return Result(rw.applied, body=resp.model_dump(exclude_none=True), namespace=namespace)
        return Result(rw.applied, stream=self._chat_stream(engine, rw, params, info), namespace=namespace)

    async def _chat_stream(self, engine: Any, rw: Rewrite, params: GenerationParams, info: KemInfo) -> AsyncIterator[bytes]:
        cid, created = new_id("chatcmpl"), now()

        def chunk(delta: ChatDelta, finish: str | None = None, kem: KemInfo | None = None) -> bytes:
            c = ChatCompletionChunk(id=cid, created=created, model=self.served_name, kem=kem,
                                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
            return sse(c.model_dump(exclude_none=True))

        yield chunk(ChatDelta(role="assistant", content=""), kem=info)
        text = []
        try:
            async for piece in engine.astream_chat(rw.request, params):
                if piece:
                    text.append(piece)
                    yield chunk(ChatDelta(content=piece))
        except Exception as exc:  # the client gets a clean error event; the server stays up
            log.warning("chat stream failed: %s", exc)
            yield error_event(exc)
            yield DONE
            return
        yield chunk(ChatDelta(), finish=finish_reason(engine, "".join(text), params))
        yield DONE

    # ---- completions ------------------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest, raw: bytes, namespace: str) -> Result:
        """Serve one completion request."""
        engine = self._engine
        upstream_model = self._check_model(req.model)
        prompt = req.prompt_text()
        rw = await self._rewrite(self.editor.rewrite_prompt, prompt, namespace, engine)
        info = kem_info(rw.applied, namespace)
        if hasattr(engine, "forward"):
            body = _forward_body(raw, req, upstream_model, "prompt", rw)
            return await self._forward(engine, "/v1/completions", body, req.stream, rw, info)
        params = self._params(req, rw.stop, rw.adapter)
        if not req.stream:
            text = await engine.agenerate(rw.request, params)
            resp = CompletionResponse(model=self.served_name, kem=info, choices=[
                CompletionChoice(text=text, finish_reason=finish_reason(engine, text, params))])
            return Result(rw.applied, body=resp.model_dump(exclude_none=True), namespace=namespace)
        return Result(rw.applied, stream=self._completion_stream(engine, rw, params, info), namespace=namespace)

    async def _completion_stream(self, engine: Any, rw: Rewrite, params: GenerationParams,
                                 info: KemInfo) -> AsyncIterator[bytes]:
        cid, created = new_id("cmpl"), now()

        def chunk(text: str, finish: str | None = None, kem: KemInfo | None = None) -> bytes:
            c = CompletionResponse(id=cid, created=created, model=self.served_name, kem=kem,
                                   choices=[CompletionChoice(text=text, finish_reason=finish)])
            return sse(c.model_dump(exclude_none=True))

        first = True
        text = []
        try:
            async for piece in engine.astream(rw.request, params):
                if piece:
                    text.append(piece)
                    yield chunk(piece, kem=info if first else None)
                    first = False
        except Exception as exc:
            log.warning("completion stream failed: %s", exc)
            yield error_event(exc)
            yield DONE
            return
        yield chunk("", finish=finish_reason(engine, "".join(text), params), kem=info if first else None)
        yield DONE

    # ---- HTTP engines -----------------------------------------------------------------------------------
    async def _forward(self, engine: Any, path: str, body: bytes, stream: bool, rw: Rewrite,
                       info: KemInfo) -> Result:
        if not stream:
            out = await engine.forward(path, body, stream=False)
            out["kem"] = info.model_dump()
            return Result(rw.applied, body=out, namespace=info.namespace)
        events = await engine.forward(path, body, stream=True)  # raises with the upstream's status
        return Result(rw.applied, stream=_pass_through(events, info), namespace=info.namespace)


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


def _forward_body(raw: bytes, req: ChatCompletionRequest | CompletionRequest, upstream_model: str,
                  key: str, rw: Rewrite) -> bytes:
    """The body to send upstream: ``raw`` itself when nothing changes, else the rewritten JSON."""
    if not rw.applied and req.model == upstream_model:
        return raw
    body = json.loads(raw)
    body["model"] = rw.adapter or upstream_model  # in scope with an edit-follower: the upstream's LoRA name
    if rw.applied:
        body[key] = rw.request
        if rw.stop:
            body["stop"] = list(dict.fromkeys(req.stop_list() + rw.stop))
    return json.dumps(body, ensure_ascii=False).encode()


class _ModelNotFound(NotFoundError):
    code = "model_not_found"
