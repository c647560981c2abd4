"""OpenAI wire models (pydantic) for kem's HTTP server: requests, responses, stream chunks, errors.

Request models accept the fields of OpenAI's API and vLLM's sampling extensions, each checked as
OpenAI / vLLM check it (``max_tokens`` >= 1, at most 4 non-empty ``stop`` strings, ``temperature`` in
[0, 2], ``top_p`` in (0, 1], penalties in [-2, 2], ``logit_bias`` values in [-100, 100], a non-empty
``prompt`` / ``messages``, ...), and refuse any other field (``extra="forbid"``): in upstream mode the
body is forwarded as received, so nothing reaches the upstream that kem did not check, and both modes
answer a bad body with the same 400. The ``kem`` field on responses lists the edits that were applied
(provenance for clients). :func:`parse_request` turns any body into a request or a
:class:`kem.errors.ValidationError` naming the field, and :func:`clamp_max_tokens` fits ``max_tokens``
to the server's ceiling and the model's context.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
)
from pydantic import ValidationError as PydanticValidationError

from kem.edit import validation_error
from kem.errors import ContextLengthError, KemError, ValidationError
from kem.keys import NO_LIMITS, KeyLimits

MAX_TOKENS_CAP = 1_000_000  # absolute cap on max_tokens; the server's own ceiling (Settings.max_tokens_ceiling) is lower
MAX_STOP = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
GREEDY_BELOW = 1e-5  # a temperature below this means greedy decoding (0.0), as vLLM treats it
MAX_N = 128  # as OpenAI's API
MAX_LOGIT_BIAS = 300  # token ids in logit_bias
MAX_TOP_K = 1_000_000
MAX_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: ``chatcmpl-<hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# ---- requests ----------------------------------------------------------------------------------------
def _str_or_strs(v: Any) -> Any:
    """One clear error for a ``str | list[str]`` field (pydantic would report each member of the union)."""
    if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        return v
    raise ValueError(f"must be a string or a list of strings (got {type(v).__name__})")


StrOrStrs = Annotated[str | list[str], BeforeValidator(_str_or_strs)]


def _check_logit_bias(v: dict[str, float] | None) -> dict[str, float] | None:
    if v is None:
        return v
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"takes at most {MAX_LOGIT_BIAS} token ids (got {len(v)})")
    for token, bias in v.items():
        if not token.isdigit() or len(token) > 10:
            raise ValueError(f"keys must be token ids (digits; got {token!r:.20})")
        if not -100.0 <= bias <= 100.0:
            raise ValueError(f"values must be between -100 and 100 (got {bias})")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM


# the sampling fields handed to engines that know them (GenerationParams.extra: vLLM's SamplingParams)
ENGINE_EXTRA = ("seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p",
                "min_tokens", "ignore_eos", "logit_bias")


class _Request(BaseModel):
    """Fields shared by chat and completion requests: OpenAI's and vLLM's sampling fields, each checked;
    any other field is refused (400 naming it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = "default"
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(
        None, ge=0.0, le=2.0,
        description=f"0: greedy; values below {GREEDY_BELOW} are read as 0 (dividing logits by them overflows).")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StrOrStrs | None = None
    stream: StrictBool = False
    n: int | None = Field(None, ge=1, le=MAX_N)  # local engines answer with one choice (single_choice())
    user: str | None = Field(None, max_length=256)
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_check_logit_bias)] = None
    # vLLM's extensions (https://docs.vllm.ai: "Extra parameters")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    ignore_eos: StrictBool | None = None

    def engine_extra(self) -> dict[str, Any]:
        """The sampling fields the client set, for engines that honour them (:data:`ENGINE_EXTRA`)."""
        return {k: getattr(self, k) for k in ENGINE_EXTRA if k in self.model_fields_set and getattr(self, k) is not None}

    @field_validator("temperature")
    @classmethod
    def _greedy_below_floor(cls, v: float | None) -> float | None:
        return 0.0 if v is not None and v < GREEDY_BELOW else v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else v or []
        if len(items) > MAX_STOP:
            raise ValueError(f"takes at most {MAX_STOP} strings (got {len(items)})")
        for s in items:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"strings must be 1 to {MAX_STOP_CHARS} characters long (got {len(s)})")
        return v

    def single_choice(self) -> None:
        """Raise a 400 naming ``n`` unless the request asks for one choice (what local engines produce)."""
        if self.n not in (None, 1):
            raise ValidationError(f"n: this engine returns one choice per request (got n={self.n}); send n=1 "
                                  "or repeat the request", field="n")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)


MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal"})


def _check_tool_choice(v: Any) -> Any:
    if v is None or v in ("none", "auto", "required") or isinstance(v, dict):
        return v
    raise ValueError(f"must be 'none', 'auto', 'required' or an object naming a tool (got {v!r:.40})")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


def _check_message(m: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(m) - MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r:.40} (a message takes {', '.join(sorted(MESSAGE_KEYS))})")
    name = m.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 256):
        raise ValueError("\"name\" must be a string of at most 256 characters")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"needs a \"role\", one of {', '.join(ROLES)} (got {role!r:.40})")
    content = m.get("content")
    if content is not None and not isinstance(content, str | list):
        raise ValueError(f"\"content\" must be a string, a list of content parts or null "
                         f"(got {type(content).__name__})")
    return m


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[Annotated[dict[str, Any], AfterValidator(_check_message)]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Annotated[Any, AfterValidator(_check_tool_choice)] = None
    parallel_tool_calls: StrictBool | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    """``POST /v1/completions`` (one prompt per request)."""

    prompt: StrOrStrs
    logprobs: int | None = Field(None, ge=0, le=5)  # as OpenAI's legacy completions
    echo: StrictBool | None = None
    suffix: str | None = Field(None, max_length=10_000)
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: str | list[str]) -> str | list[str]:
        if not v or (isinstance(v, list) and not all(v)):
            raise ValueError(f"must be a non-empty string (got {v!r:.40})")
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValidationError("prompt: kem serves one prompt per request (got a list of "
                                      f"{len(self.prompt)}); send them as separate requests", field="prompt")
            return self.prompt[0]
        return self.prompt


R = TypeVar("R", bound=BaseModel)


def parse_request(model: type[R], raw: bytes | str) -> R:
    """``raw`` (a JSON body) as ``model``, or a :class:`ValidationError` (400) naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except PydanticValidationError as exc:
        raise validation_error(model.__name__, exc) from None


def clamp_max_tokens(requested: int | None, prompt_tokens: int, context: int, ceiling: int, *,
                     default: int | None = None, field: str = "max_tokens", prompt_field: str = "messages") -> int:
    """The completion length to generate: ``requested`` checked against the server's ``ceiling`` and the
    model's ``context`` (``prompt_tokens`` counted after kem's rewrite), or when none was requested,
    ``default`` (else ``ceiling``) cut to what fits.

    Raises:
        ContextLengthError: The prompt fills the context (``field=prompt_field``), or prompt + ``requested``
            exceeds it (``field=field``); HTTP 400, code ``context_length_exceeded``.
        ValidationError: ``requested`` is below 1 or above ``ceiling`` (HTTP 400 naming ``field``).
    """
    room = context - prompt_tokens
    if room <= 0:
        raise ContextLengthError(f"This model's maximum context length is {context} tokens, and the "
                                 f"{prompt_field} take {prompt_tokens} of them, leaving none for the completion. "
                                 f"Please reduce the length of the {prompt_field}.", field=prompt_field)
    if requested is None:
        return max(1, min(default or ceiling, ceiling, room))
    if requested < 1 or requested > ceiling:
        raise ValidationError(f"{field} must be between 1 and {ceiling} on this server (got {requested})",
                              field=field)
    if requested > room:
        raise ContextLengthError(f"This model's maximum context length is {context} tokens. However, you "
                                 f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the "
                                 f"{prompt_field}, {requested} in the completion). Please reduce the length of "
                                 f"the {prompt_field} or {field}.", field=field)
    return requested


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
    superseded: list[str] = []  # ids of earlier live edits the import superseded


class ReloadRequest(BaseModel):
    """``POST /admin/reload``: switch to a new model version (a folder for in-process engines, an upstream
    URL in upstream mode) and/or declare the versions whose edits the weights absorbed."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, min_length=1, description="New model folder (in-process engines).")
    upstream: str | None = Field(None, min_length=1, description="New upstream URL (upstream mode).")
    version: str | None = None
    absorbed_versions: list[str] | None = None
    name: str | None = None


@dataclass(frozen=True)
class KeyRequest:
    """``POST /admin/keys``: ``{"namespace": "...", "admin": false, "review": false, "rpm": N, "tpm": N,
    "parallel": N}``; every field but the namespace may be left out."""

    namespace: str
    admin: bool = False
    review: bool = False
    limits: KeyLimits = NO_LIMITS

    @classmethod
    def from_body(cls, body: Any) -> KeyRequest:
        """Read a request body; a 400 naming the field when it is not of that shape."""
        body = body or {}
        ns = body.get("namespace") if isinstance(body, dict) else None
        if not isinstance(ns, str):
            raise ValidationError('send {"namespace": "...", "admin": false, "review": false, "rpm": N, "tpm": N, '
                                  '"parallel": N}', field="namespace")
        flags = {}
        for flag in ("admin", "review"):
            flags[flag] = body.get(flag, False)
            if not isinstance(flags[flag], bool):
                raise ValidationError(f"{flag} must be true or false (got {flags[flag]!r})", field=flag)
        limits = KeyLimits(**{k: body[k] for k in ("rpm", "tpm", "parallel") if body.get(k) is not None})
        return cls(ns, flags["admin"], flags["review"], limits)

    def created(self, key: str) -> dict[str, Any]:
        """The 201 body: the new key (shown once) and what it may do."""
        return {"object": "api_key", "key": key, "namespace": self.namespace,
                **({"review": True} if self.review else {}),
                **{k: v for k, v in vars(self.limits).items() if v is not None}}
