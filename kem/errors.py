"""kem's exception tree. Every error kem raises on purpose derives from KemError.

    KemError
    ├── ValidationError          bad input; names the field and the fix (HTTP 400)
    │   ├── DatasetFormatError   a dataset record is malformed; names the record (HTTP 400)
    │   └── ContextLengthError   prompt + max_tokens do not fit the model's context (HTTP 400)
    ├── NotFoundError            an edit, version or model that does not exist (HTTP 404)
    ├── ConflictError            the request contradicts stored state (HTTP 409)
    ├── AuthError                missing or wrong API key (HTTP 401)
    │   └── ForbiddenError       a key asking for another namespace (HTTP 403)
    ├── RateLimitError           a key over its request, token or concurrency limit (HTTP 429)
    ├── ModelError               a model could not be found, converted or loaded (HTTP 500)
    ├── StoreError               the edit store is unreadable or of a newer schema (HTTP 500)
    │   └── StoreUnavailable     the edit store's server (PostgreSQL) cannot be reached (HTTP 503)
    ├── EngineError              the generation engine failed (HTTP 502 / upstream's status)
    │   ├── DeadlineExceeded     a generation ran past its deadline and was stopped (HTTP 504)
    │   └── RequestCancelled     the client went away; its generation was stopped (HTTP 499)
    └── ConsolidationError       a consolidation job failed; nothing was published (HTTP 500)
        └── GateError            the edited model did not pass the checks (HTTP 422)
"""

from __future__ import annotations

import math


class KemError(Exception):
    """Base class of every error kem raises on purpose."""

    status_code: int = 500
    code: str = "kem_error"


class ValidationError(KemError, ValueError):
    """Bad input. The message names the field and says how to fix it."""

    status_code = 400
    code = "invalid_request_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DatasetFormatError(ValidationError):
    """A record of an imported dataset is malformed."""


class ContextLengthError(ValidationError):
    """The prompt, or the prompt plus the requested completion, does not fit the model's context window."""

    code = "context_length_exceeded"


class NotFoundError(KemError, KeyError):
    status_code = 404
    code = "not_found"

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConflictError(KemError):
    status_code = 409
    code = "conflict"


class AuthError(KemError):
    status_code = 401
    code = "invalid_api_key"


class ForbiddenError(AuthError):
    status_code = 403
    code = "forbidden"


class RateLimitError(KemError):
    """An API key is over one of its limits (requests or tokens per minute, requests in flight).

    Args:
        message: What was exceeded and when to retry.
        retry_after: Seconds after which the same request would be admitted (sent as ``Retry-After``).
    """

    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, float(retry_after))

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers for the 429 response: ``Retry-After`` in whole seconds (at least 1)."""
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))}


class ModelError(KemError):
    status_code = 500
    code = "model_error"


class StoreError(KemError):
    status_code = 500
    code = "store_error"


class StoreUnavailable(StoreError):
    """The edit store's database server cannot be reached (down, restarting, every connection busy);
    the same request may succeed once it is back."""

    status_code = 503
    code = "store_unavailable"


class EngineError(KemError):
    status_code = 502
    code = "engine_error"

    def __init__(self, message: str, *, status_code: int | None = None, body: object = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.body = body


class DeadlineExceeded(EngineError):
    """A generation ran past its per-request deadline (``KEM_REQUEST_TIMEOUT``) and was stopped."""

    code = "timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=504)


class RequestCancelled(EngineError):
    """The client closed the request; the engine stopped generating for it (nginx's 499)."""

    code = "request_cancelled"

    def __init__(self, message: str = "the client closed the request") -> None:
        super().__init__(message, status_code=499)


class ConsolidationError(KemError):
    status_code = 500
    code = "consolidation_error"


class GateError(ConsolidationError):
    status_code = 422
    code = "gate_failed"
