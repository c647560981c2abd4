"""Rate and concurrency limits shared by replicas on one PostgreSQL store (:mod:`kem.stores.pg_limits`,
:class:`kem.server.limits.SharedLimiter`), on the tests' real PostgreSQL server. Two limiters over two
store connections stand for two replicas: all their state is in the database. bench/bench_limits.py
runs the same against real ``kem serve`` replicas under load."""

from __future__ import annotations

import time

import pytest

from kem.errors import RateLimitError, ValidationError
from kem.server.auth import Principal
from kem.server.limits import KeyLimits, SharedLimiter
from kem.stores import open_store


@pytest.fixture()
def replicas(pg_url, tmp_path):
    stores = [open_store(url=pg_url, home=tmp_path) for _ in range(2)]
    limiters = [SharedLimiter(s.shared_limits(lease=1.0)) for s in stores]
    yield limiters
    for lim, s in zip(limiters, stores, strict=True):
        lim.close()
        s.close()


def key(name: str, **limits) -> Principal:
    return Principal("alice", key_id=name, limits=KeyLimits(**limits))


def test_rpm_holds_across_replicas(replicas):
    a, b = replicas
    p = key("k-rpm", rpm=4)
    admitted = 0
    for i in range(10):
        try:
            (a if i % 2 else b).acquire(p, 1).release()
            admitted += 1
        except RateLimitError as exc:  # a sliding minute: the first request leaves the window after 60 s
            assert "4 requests per minute" in str(exc) and 55 < exc.retry_after <= 60
    assert admitted == 4  # per-process buckets would have admitted 8
    other = key("k-other", rpm=4)  # another key has its own bucket
    a.acquire(other, 1).release()


def test_the_window_slides(pg_url, tmp_path):
    store = open_store(url=pg_url, home=tmp_path)
    lim = SharedLimiter(store.shared_limits(window=1.5))
    p = key("k-slide", rpm=2)
    lim.acquire(p).release()
    time.sleep(0.8)
    lim.acquire(p).release()
    with pytest.raises(RateLimitError) as exc:
        lim.acquire(p)
    assert 0.5 < exc.value.retry_after <= 0.8  # when the first request leaves the window
    time.sleep(exc.value.retry_after + 0.05)
    lim.acquire(p).release()  # one slot again, not two: the second request is still in the window
    with pytest.raises(RateLimitError):
        lim.acquire(p)
    lim.close()
    store.close()


def test_parallel_holds_across_replicas_and_a_dead_replicas_slots_expire(replicas):
    a, b = replicas
    p = key("k-par", parallel=2)
    first, second = a.acquire(p), b.acquire(p)
    with pytest.raises(RateLimitError, match="2 requests in flight across the replicas"):
        a.acquire(p)
    second.release()
    deadline = time.monotonic() + 5
    while True:  # the release runs on a background thread
        try:
            third = a.acquire(p)
            break
        except RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert b.usage("k-par", p.limits)["inflight"] == 2
    # a replica that dies keeps its slots only until their lease (1 s here) ends
    time.sleep(1.2)
    fourth = b.acquire(p)
    for adm in (first, third, fourth):
        adm.release()


def test_tpm_is_shared_and_refused_before_anything_is_charged(replicas):
    a, b = replicas
    p = key("k-tpm", tpm=100)
    a.acquire(p, 60).release()
    with pytest.raises(RateLimitError, match="100 tokens per minute"):
        b.acquire(p, 60)
    with pytest.raises(ValidationError, match="may use 100 tokens per minute"):
        b.acquire(p, 101)  # larger than the whole minute: a 400, not a 429
    left = a.usage("k-tpm", p.limits)
    assert left["remaining_tokens"] == 40 and left["tpm"] == 100 and left["remaining_requests"] is None
    adm = b.acquire(p, 30)
    adm.settle(10)  # used less than reserved: the rest comes back, for both replicas
    deadline = time.monotonic() + 5
    while a.usage("k-tpm", p.limits)["remaining_tokens"] != 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.usage("k-tpm", p.limits)["remaining_tokens"] == 30
    adm.release()


def test_keys_without_limits_never_reach_the_database(replicas):
    a, _ = replicas
    adm = a.acquire(key("k-free"), 10_000)
    adm.release()
    with a.buckets._connection() as conn:
        assert conn.execute("SELECT count(*) FROM limit_keys WHERE key_id = 'k-free'").fetchone()[0] == 0


def test_serving_on_a_postgres_store_uses_the_shared_limiter(pg_url, tmp_path, kem_settings, embedder, generator):
    from kem.editor import KnowledgeEditor
    from kem.server.limits import Limiter
    from kem.server.serving import Serving

    settings = kem_settings.model_copy(update={"store": pg_url, "sync_interval": 0, "home": tmp_path})
    with KnowledgeEditor.open(settings=settings, embedder=embedder, generator=generator) as ke:
        assert isinstance(Serving(ke, generator).limiter, SharedLimiter)
        off = settings.model_copy(update={"shared_limits": False})
        assert type(Serving(ke, generator, settings=off).limiter) is Limiter
