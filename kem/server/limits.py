"""Per-API-key limits for ``kem serve``: requests per minute, tokens per minute, requests in flight.

No web framework here: a route asks :meth:`Limiter.admit` (or :meth:`Limiter.acquire`) before it
generates and gets a :class:`RateLimitError` (HTTP 429, with ``retry_after``) when the key is over a
limit. Requests and tokens are token buckets that start full and refill evenly over a minute, so a key
may burst up to its whole minute's allowance and then runs at ``rpm / 60`` requests a second. A
request's tokens are reserved when it is admitted (prompt + ``max_tokens``) and settled to what it used
(:meth:`Admission.settle`), so an answer that stops early gives the unused tokens back.

Limits come from the keys file (``rpm=``, ``tpm=``, ``parallel=`` on a key's line, see
:mod:`kem.server.auth`) and from ``Settings.max_parallel_per_key`` for keys that set no ``parallel=``.
With auth off every caller is the same (anonymous) key, so the limits apply to all of them together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kem.errors import RateLimitError, ValidationError
from kem.keys import NO_LIMITS, KeyLimits

if TYPE_CHECKING:
    from kem.server.auth import Principal

log = logging.getLogger(__name__)

# A key at its concurrency limit has no exact time when a slot frees; clients are told to retry after this.
PARALLEL_RETRY_AFTER = 1.0


class _Bucket:
    """A token bucket holding at most ``per_minute`` and refilling ``per_minute`` over 60 s. The level may
    go below zero when a request used more than it reserved; that debt is repaid by the refill."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.level = self.capacity
        self.stamp = now

    @property
    def rate(self) -> float:  # per second
        return self.capacity / 60.0

    def refill(self, now: float, per_minute: int) -> None:
        if per_minute != self.capacity:  # the keys file changed this key's limit: keep the level, clipped
            self.capacity = float(per_minute)
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 when it is now)."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate


@dataclass
class _KeyState:
    inflight: int = 0
    requests: _Bucket | None = None
    tokens: _Bucket | None = None


class Admission:
    """One admitted request: :meth:`settle` its real token count when known, :meth:`release` when done
    (both at most once; :meth:`Limiter.admit` releases on exit)."""

    def __init__(self, limiter: Limiter, key: str, tokens: int, limits: KeyLimits, parallel: int | None,
                 lease: str | None = None) -> None:
        self._limiter = limiter
        self.lease = lease  # a shared limiter's in-flight row
        self.key = key
        self.tokens = tokens
        self.limits = limits
        self.parallel = parallel
        self._settled = False
        self._released = False

    def settle(self, used_tokens: int) -> None:
        """Charge what the request really used (prompt + completion) instead of what was reserved."""
        if self._settled:
            return
        self._settled = True
        self._limiter._settle(self.key, self.tokens, used_tokens, self.limits, self.lease)

    def release(self) -> None:
        """Free the request's in-flight slot (idempotent). Streams call it when the stream ends."""
        if self._released:
            return
        self._released = True
        self._limiter._release(self.key, self.lease)

    def headers(self) -> dict[str, str]:
        """OpenAI-style ``x-ratelimit-*`` headers for the key's current state (only the limits it has)."""
        return self._limiter.headers(self.key, self.limits)


class Limiter:
    """Per-key request, token and concurrency limits.

    Args:
        max_parallel_per_key: Requests in flight per key for keys whose entry sets no ``parallel=``
            (``Settings.max_parallel_per_key``); 0: no limit.
        clock: Seconds, monotonic (injectable for tests).
    """

    def __init__(self, max_parallel_per_key: int = 0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_parallel_per_key < 0:
            raise ValidationError("max_parallel_per_key must be >= 0 (0: no limit)", field="max_parallel_per_key")
        self.max_parallel_per_key = max_parallel_per_key
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyState] = {}

    def _parallel(self, limits: KeyLimits) -> int | None:
        if limits.parallel is not None:
            return limits.parallel
        return self.max_parallel_per_key or None

    def acquire(self, principal: Principal, tokens: int = 0) -> Admission:
        """Admit one request of ``tokens`` (prompt + max_tokens) for ``principal`` or raise.

        Nothing is charged when the request is refused. The caller must :meth:`Admission.release` it.

        Raises:
            RateLimitError: The key is over its rpm, tpm or parallel limit (429; ``retry_after`` seconds).
            ValidationError: ``tokens`` exceeds the key's whole ``tpm``: no wait would admit it (400).
        """
        key, limits = principal.key_id, principal.limits
        parallel = self._parallel(limits)
        who = self._check(key, limits, tokens)
        with self._lock:
            now = self._clock()
            st = self._keys.setdefault(key, _KeyState())
            if parallel is not None and st.inflight >= parallel:
                raise RateLimitError(f"{who} has {st.inflight} requests in flight, its limit (parallel={parallel}); "
                                     "retry when one finishes", retry_after=PARALLEL_RETRY_AFTER)
            waits: list[tuple[float, str]] = []
            if limits.rpm is not None:
                st.requests = st.requests or _Bucket(limits.rpm, now)
                st.requests.refill(now, limits.rpm)
                waits.append((st.requests.wait(1), f"{limits.rpm} requests per minute (rpm)"))
            else:
                st.requests = None
            if limits.tpm is not None:
                st.tokens = st.tokens or _Bucket(limits.tpm, now)
                st.tokens.refill(now, limits.tpm)
                waits.append((st.tokens.wait(tokens), f"{limits.tpm} tokens per minute (tpm; this request "
                                                      f"needs {tokens})"))
            else:
                st.tokens = None
            wait, what = max(waits, default=(0.0, ""))
            if wait > 0:
                raise RateLimitError(f"rate limit reached for {who}: {what}; retry in {wait:.1f} s",
                                     retry_after=wait)
            st.inflight += 1
            if st.requests is not None:
                st.requests.level -= 1
            if st.tokens is not None:
                st.tokens.level -= tokens
        return Admission(self, key, tokens, limits, parallel)

    @staticmethod
    def _check(key: str, limits: KeyLimits, tokens: int) -> str:
        """Who the key is in messages; refuses a request larger than the key's whole tpm."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0 (got {tokens})")
        who = f"API key {key}" if key else "this server (auth off)"
        if limits.tpm is not None and tokens > limits.tpm:
            raise ValidationError(f"this request needs {tokens} tokens (prompt + max_tokens) but {who} may use "
                                  f"{limits.tpm} tokens per minute; lower max_tokens or shorten the prompt",
                                  field="max_tokens")
        return who

    @property
    def shared(self) -> bool:
        """Whether acquiring asks a database (callers then run it off the event loop)."""
        return False

    @asynccontextmanager
    async def admit(self, principal: Principal, tokens: int = 0) -> AsyncIterator[Admission]:
        """``async with limiter.admit(p, tokens) as a:`` admits (or raises, see :meth:`acquire`) and frees
        the in-flight slot on exit. Inside, ``a.settle(used)`` charges the real token count."""
        admission = self.acquire(principal, tokens)
        try:
            yield admission
        finally:
            admission.release()

    def _settle(self, key: str, reserved: int, used: int, limits: KeyLimits = NO_LIMITS,
                lease: str | None = None) -> None:
        with self._lock:
            st = self._keys.get(key)
            if st is not None and st.tokens is not None:
                st.tokens.level = min(st.tokens.capacity, st.tokens.level + reserved - max(0, used))

    def _release(self, key: str, lease: str | None = None) -> None:
        with self._lock:
            st = self._keys.get(key)
            if st is not None and st.inflight > 0:
                st.inflight -= 1

    def inflight(self, principal: Principal) -> int:
        """Requests of ``principal``'s key in flight now."""
        with self._lock:
            st = self._keys.get(principal.key_id)
            return st.inflight if st else 0

    def _remaining(self, key: str, limits: KeyLimits) -> dict[str, int]:
        """What is left now of the key's rpm (``requests``) and tpm (``tokens``), refilled to now (only the
        limits it has)."""
        out: dict[str, int] = {}
        with self._lock:
            now = self._clock()
            st = self._keys.get(key)
            for name, per_minute, bucket in (("requests", limits.rpm, st and st.requests),
                                             ("tokens", limits.tpm, st and st.tokens)):
                if per_minute is None:
                    continue
                level = float(per_minute)
                if bucket:
                    bucket.refill(now, per_minute)
                    level = bucket.level
                out[name] = max(0, int(level))
        return out

    def headers(self, key: str, limits: KeyLimits) -> dict[str, str]:
        """``x-ratelimit-limit/remaining-requests/tokens`` for ``key`` (as OpenAI sends them)."""
        out: dict[str, str] = {}
        for name, left in self._remaining(key, limits).items():
            out[f"x-ratelimit-limit-{name}"] = str(limits.rpm if name == "requests" else limits.tpm)
            out[f"x-ratelimit-remaining-{name}"] = str(left)
        return out

    def usage(self, key: str, limits: KeyLimits) -> dict[str, int | None]:
        """One key's state against its limits (the console's health page): requests in flight and the
        parallel limit, and for rpm / tpm the limit and what is left now (None: no such limit)."""
        left = self._remaining(key, limits)
        with self._lock:
            st = self._keys.get(key)
            inflight = st.inflight if st else 0
        return {"inflight": inflight, "parallel": self._parallel(limits), "rpm": limits.rpm,
                "remaining_requests": left.get("requests"), "tpm": limits.tpm, "remaining_tokens": left.get("tokens")}


class SharedLimiter(Limiter):
    """:class:`Limiter` whose counts live in the PostgreSQL store (:class:`kem.stores.pg_limits.SharedBuckets`),
    so every replica on that store charges the same ones: a key's rpm / tpm / parallel hold across
    replicas. rpm / tpm are sliding 60-second windows there (at most rpm requests in any minute); keys
    with no limit never reach the database.
    Releasing and settling run on a background thread (a lost release frees itself when its lease ends).

    Args:
        buckets: The store's shared buckets (``PostgresStore.shared_limits()``).
        max_parallel_per_key: As for :class:`Limiter`.
    """

    def __init__(self, buckets: Any, max_parallel_per_key: int = 0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(max_parallel_per_key)
        self.buckets = buckets
        self._background = ThreadPoolExecutor(2, thread_name_prefix="kem-limits")

    @property
    def shared(self) -> bool:
        return True

    def acquire(self, principal: Principal, tokens: int = 0) -> Admission:
        key, limits = principal.key_id, principal.limits
        parallel = self._parallel(limits)
        if limits.rpm is None and limits.tpm is None and parallel is None:
            return super().acquire(principal, tokens)  # nothing to count
        who = self._check(key, limits, tokens)
        taken = self.buckets.take(key, limits.rpm, limits.tpm, parallel, tokens)
        if not taken.admitted:
            if taken.reason == "parallel":
                raise RateLimitError(f"{who} has {taken.inflight} requests in flight across the replicas, its limit "
                                     f"(parallel={parallel}); retry when one finishes", retry_after=PARALLEL_RETRY_AFTER)
            what = (f"{limits.rpm} requests per minute (rpm)" if taken.reason == "rpm"
                    else f"{limits.tpm} tokens per minute (tpm; this request needs {tokens})")
            raise RateLimitError(f"rate limit reached for {who}: {what}; retry in {taken.wait:.1f} s",
                                 retry_after=taken.wait)
        with self._lock:
            self._keys.setdefault(key, _KeyState()).inflight += 1
        return Admission(self, key, tokens, limits, parallel, lease=taken.lease)

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        def guarded() -> None:
            try:
                fn(*args)
            except Exception:  # the lease ends by itself; the next request refills the bucket
                log.warning("shared limits: %s failed", getattr(fn, "__name__", fn), exc_info=True)

        self._background.submit(guarded)

    def _settle(self, key: str, reserved: int, used: int, limits: KeyLimits = NO_LIMITS,
                lease: str | None = None) -> None:
        if limits.tpm is not None and reserved != used and lease is not None:
            self._run(self.buckets.settle, lease, used)

    def _release(self, key: str, lease: str | None = None) -> None:
        super()._release(key)
        if lease is not None:
            self._run(self.buckets.release, lease)

    def usage(self, key: str, limits: KeyLimits) -> dict[str, int | None]:
        state = self.buckets.state(key, limits.rpm, limits.tpm)

        def left(v: float | None) -> int | None:
            return None if v is None else max(0, int(v))

        return {"inflight": state["inflight"], "parallel": self._parallel(limits), "rpm": limits.rpm,
                "remaining_requests": left(state["requests"]), "tpm": limits.tpm,
                "remaining_tokens": left(state["tokens"])}

    def close(self) -> None:
        self._background.shutdown(wait=True)
