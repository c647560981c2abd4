"""Per-key limits (kem.server.limits) on a fake clock: rpm, tpm, requests in flight, settle, headers."""

from __future__ import annotations

import asyncio

import pytest

from kem.errors import KemError, RateLimitError, ValidationError
from kem.server.auth import Principal
from kem.server.limits import PARALLEL_RETRY_AFTER, KeyLimits, Limiter
from kem.server.protocol import kem_error_body


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def key(name: str = "alice", **limits: int) -> Principal:
    return Principal(name, key_id=f"{name}-id", limits=KeyLimits(**limits))


def test_rpm_bursts_then_refills_evenly(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    p = key(rpm=3)
    for _ in range(3):
        lim.acquire(p).release()
    with pytest.raises(RateLimitError) as info:
        lim.acquire(p)
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.retry_after == pytest.approx(20.0)  # 3 per minute: one every 20 s
    assert info.value.headers == {"retry-after": "20"}
    assert "3 requests per minute" in str(info.value)
    clock.advance(19.9)
    with pytest.raises(RateLimitError) as info:
        lim.acquire(p)
    assert info.value.retry_after == pytest.approx(0.1)
    assert info.value.headers == {"retry-after": "1"}  # whole seconds, at least 1
    clock.advance(0.1)
    lim.acquire(p).release()
    clock.advance(3600)  # a long idle time refills to the burst size, no more
    for _ in range(3):
        lim.acquire(p).release()
    with pytest.raises(RateLimitError):
        lim.acquire(p)


def test_tpm_counts_tokens_and_settle_refunds(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    p = key(tpm=600)  # 10 tokens a second
    a = lim.acquire(p, 500)
    with pytest.raises(RateLimitError) as info:
        lim.acquire(p, 200)
    assert info.value.retry_after == pytest.approx(10.0)  # 100 left, 100 more at 10/s
    assert "600 tokens per minute" in str(info.value) and "needs 200" in str(info.value)
    a.settle(150)  # it used 150 of the 500 it reserved
    a.settle(0)  # settling twice changes nothing
    a.release()
    lim.acquire(p, 450).release()  # 600 - 150 = 450 left
    with pytest.raises(RateLimitError):
        lim.acquire(p, 1)


def test_overrun_becomes_debt(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    p = key(tpm=60)  # 1 token a second
    a = lim.acquire(p, 10)
    a.settle(90)  # used far more than reserved (a stream that ignored max_tokens): 60 - 90 = -30
    a.release()
    with pytest.raises(RateLimitError) as info:
        lim.acquire(p, 1)
    assert info.value.retry_after == pytest.approx(31.0)


def test_request_bigger_than_tpm_is_a_400_not_a_retry(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    with pytest.raises(ValidationError) as info:
        lim.acquire(key(tpm=100), 101)
    assert info.value.status_code == 400 and info.value.field == "max_tokens"
    lim.acquire(key(tpm=100), 100).release()


def test_refusal_charges_nothing(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    p = key(rpm=2, tpm=100)
    lim.acquire(p, 90).release()
    for _ in range(5):  # refused on tokens: the request allowance is not used up by the refusals
        with pytest.raises(RateLimitError):
            lim.acquire(p, 50)
    lim.acquire(p, 10).release()


def test_retry_after_is_the_longest_wait(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    p = key(rpm=60, tpm=60)  # 1 request and 1 token a second
    lim.acquire(p, 60).release()
    with pytest.raises(RateLimitError) as info:
        lim.acquire(p, 30)
    assert info.value.retry_after == pytest.approx(30.0)
    assert "tokens per minute" in str(info.value)


def test_parallel_limit_per_key_and_server_default(clock: Clock) -> None:
    lim = Limiter(max_parallel_per_key=2, clock=clock)
    alice, bob, carol = key("alice"), key("bob"), key("carol", parallel=3)
    held = [lim.acquire(alice), lim.acquire(alice)]
    with pytest.raises(RateLimitError) as info:
        lim.acquire(alice)
    assert info.value.retry_after == PARALLEL_RETRY_AFTER and "parallel=2" in str(info.value)
    lim.acquire(bob).release()  # keys are independent
    held += [lim.acquire(carol) for _ in range(3)]  # a key's own parallel= overrides the server default
    with pytest.raises(RateLimitError):
        lim.acquire(carol)
    assert lim.inflight(alice) == 2
    held[0].release()
    held[0].release()  # releasing twice frees one slot, not two
    assert lim.inflight(alice) == 1
    lim.acquire(alice)
    with pytest.raises(RateLimitError):
        lim.acquire(alice)


def test_no_limits_admits_everything(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    anon = Principal("default", admin=True)  # auth off
    held = [lim.acquire(anon, 10**9) for _ in range(1000)]
    assert lim.inflight(anon) == 1000 and held[0].headers() == {}


def test_limits_changed_in_the_keys_file_apply(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    lim.acquire(key(rpm=10)).release()
    lim.acquire(key(rpm=2)).release()  # the key now allows 2 a minute: 9 left is clipped to 2, one used
    lim.acquire(key(rpm=2)).release()
    with pytest.raises(RateLimitError):
        lim.acquire(key(rpm=2))
    lim.acquire(key()).release()  # the limit removed: admitted


def test_admit_context_manager_releases_on_error(clock: Clock) -> None:
    lim = Limiter(max_parallel_per_key=1, clock=clock)
    p = key(tpm=100)

    async def go() -> None:
        async with lim.admit(p, 40) as a:
            assert lim.inflight(p) == 1
            with pytest.raises(RateLimitError):
                async with lim.admit(p, 1):
                    pass
            a.settle(20)
        assert lim.inflight(p) == 0
        with pytest.raises(RuntimeError):
            async with lim.admit(p, 10):
                raise RuntimeError("the engine failed")
        assert lim.inflight(p) == 0

    asyncio.run(go())
    lim.acquire(p, 70).release()  # 100 - 20 - 10 = 70 left


def test_concurrent_tasks_never_exceed_parallel(clock: Clock) -> None:
    lim = Limiter(max_parallel_per_key=3, clock=clock)
    p = key()
    peak = 0
    refused = 0

    async def one() -> None:
        nonlocal peak, refused
        try:
            async with lim.admit(p):
                peak = max(peak, lim.inflight(p))
                await asyncio.sleep(0)
        except RateLimitError:
            refused += 1

    async def go() -> None:
        await asyncio.gather(*(one() for _ in range(20)))

    asyncio.run(go())
    assert peak == 3 and refused == 17 and lim.inflight(p) == 0


def test_headers(clock: Clock) -> None:
    lim = Limiter(clock=clock)
    p = key(rpm=10, tpm=1000)
    a = lim.acquire(p, 300)
    assert a.headers() == {"x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",
                           "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "700"}
    clock.advance(6)  # +1 request, +100 tokens
    assert a.headers()["x-ratelimit-remaining-tokens"] == "800"
    assert a.headers()["x-ratelimit-remaining-requests"] == "10"


def test_error_body_is_openai_style() -> None:
    exc = RateLimitError("slow down", retry_after=2.5)
    assert isinstance(exc, KemError)
    assert kem_error_body(exc) == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                             "code": "rate_limit_exceeded"}}
    assert exc.headers == {"retry-after": "3"}


@pytest.mark.parametrize("bad", [{"rpm": 0}, {"tpm": -5}, {"parallel": 1.5}, {"rpm": True}])
def test_bad_limits_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        KeyLimits(**bad)
    with pytest.raises(ValidationError):
        Limiter(max_parallel_per_key=-1)


def test_negative_tokens_is_a_programming_error(clock: Clock) -> None:
    with pytest.raises(ValueError):
        Limiter(clock=clock).acquire(key(), -1)
