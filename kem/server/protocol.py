"""OpenAI wire models (pydantic) for kem's HTTP server: requests, responses, stream chunks, errors.

Request models keep unknown fields (``extra="allow"``) so they reach the engine unchanged; the
``kem`` field on responses lists the edits that were applied (provenance for clients).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kem.errors import KemError


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: ``chatcmpl-<hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# ---- requests ----------------------------------------------------------------------------------------
class _Request(BaseModel):
    """Fields shared by chat and completion requests. Unknown fields are kept (``model_extra``)."""

    model_config = ConfigDict(extra="allow")

    model: str = "default"
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int | None = Field(None, ge=1)  # local engines answer with one choice; upstreams may do more
    user: str | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        opts = (self.model_extra or {}).get("stream_options") or {}
        return bool(isinstance(opts, dict) and opts.get("include_usage"))


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    """``POST /v1/completions`` (one prompt per request)."""

    prompt: str | list[str]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                from kem.errors import ValidationError

                raise ValidationError("prompt: kem serves one prompt per request (got a list of "
                                      f"{len(self.prompt)}); send them as separate requests", field="prompt")
            return self.prompt[0]
        return self.prompt


# ---- provenance ----------------------------------------------------------------------------------------
class AppliedEdit(BaseModel):
    id: str
    score: float
    subject: str | None = None
    target_new: str | None = None


class KemInfo(BaseModel):
    """The ``kem`` field of a response: which edits were applied, and in which namespace."""

    edits: list[AppliedEdit] = Field(default_factory=list)
    namespace: str | None = None


# ---- responses ---------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None = "stop"
    logprobs: Any = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    kem: KemInfo | None = None


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    kem: KemInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = "stop"
    logprobs: Any = None


class CompletionResponse(BaseModel):
    """Also used for stream chunks (``object`` stays ``text_completion`` in OpenAI's format)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kem: KemInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "kem"
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- errors ------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(message: str, status: int, code: str | int | None = None, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
    etype = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorDetail(message=message, type=etype, param=param, code=code)).model_dump()


def kem_error_body(exc: KemError) -> dict[str, Any]:
    """The error body for one of kem's exceptions (an upstream's own body is kept when it has one)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    param = getattr(exc, "field", None)
    return error_body(str(exc), exc.status_code, exc.code, None if param == "(record)" else param)


# ---- the edits API -----------------------------------------------------------------------------------
class EditPage(BaseModel):
    """``GET /v1/edits``: one page of edits."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    total: int
    limit: int
    offset: int
    next_offset: int | None = None


class BulkResult(BaseModel):
    object: Literal["edit.import"] = "edit.import"
    created: int
    ids: list[str]


class ReloadRequest(BaseModel):
    """``POST /admin/reload``: switch to a new model version (a folder for in-process engines, an upstream
    URL in upstream mode) and/or declare the versions whose edits the weights absorbed."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, min_length=1, description="New model folder (in-process engines).")
    upstream: str | None = Field(None, min_length=1, description="New upstream URL (upstream mode).")
    version: str | None = None
    absorbed_versions: list[str] | None = None
    name: str | None = None
