"""Rate limits across replicas (issue 25): one key limited to ``--rpm`` requests per minute, sent
requests as fast as ``--clients`` threads can for ``--seconds``, round robin over ``--replicas`` real
``kem serve`` processes on one PostgreSQL store (keys in the store: ``--keys store``). Two runs in one
process, same load: the limits kept in the database (``KEM_SHARED_LIMITS`` on, the default) and each
replica counting its own (``KEM_SHARED_LIMITS=false``, kem before this change). Also the cost: the
shared check's own time (``SharedBuckets.take`` + release, in process, against the same database),
and a request's latency through a replica for a key with limits against a key with none.

Everything is real: a throw-away PostgreSQL 15 (tests/postgres_server.py) and ``kem serve`` processes
with SmolLM2-135M (one torch thread each); requests are completions of ``max_tokens=1``.

    .venv/bin/python bench/bench_limits.py [--rpm 30] [--seconds 60] [--replicas 3] [--clients 6]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_scale_out import Replica  # noqa: E402

KEYS = {"limited": "sk-bench-limited", "free": "sk-bench-free", "cost": "sk-bench-cost"}
BODY = {"model": "default", "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}


def add_keys(url: str, rpm: int) -> None:
    from kem.server.auth import KeyEntry, digest
    from kem.server.limits import KeyLimits
    from kem.stores.pg_keys import PostgresKeys

    backend = PostgresKeys(url)
    for name, limits in (("limited", KeyLimits(rpm=rpm)), ("free", KeyLimits()), ("cost", KeyLimits(rpm=10**7))):
        backend.add(KeyEntry(digest(KEYS[name]), "alice", False, limits))


def hammer(replicas: list[Replica], seconds: float, clients: int) -> dict[str, object]:
    """Requests as fast as possible with the limited key; the 200s' times."""
    urls = itertools.cycle([r.url for r in replicas])
    lock = threading.Lock()
    ok: list[float] = []
    codes: dict[int, int] = {}
    t0 = time.monotonic()
    stop = t0 + seconds

    def worker() -> None:
        with httpx.Client(timeout=120, headers={"authorization": f"Bearer {KEYS['limited']}"}) as c:
            while time.monotonic() < stop:
                with lock:
                    url = next(urls)
                r = c.post(url + "/v1/completions", json=BODY)
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        ok.append(time.monotonic() - t0)
                if r.status_code == 429:
                    time.sleep(0.02)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"accepted": len(ok), "codes": dict(sorted(codes.items())), "attempts": sum(codes.values())}


def latency(replica: Replica, key: str, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=120, headers={"authorization": f"Bearer {KEYS[key]}"}) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            assert c.post(replica.url + "/v1/completions", json=BODY).status_code == 200
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpm", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--latency", type=int, default=40, help="requests per key for the latency comparison")
    args = ap.parse_args()

    from kem.stores import open_store
    from tests.postgres_server import PostgresServer

    rows = []
    with tempfile.TemporaryDirectory(prefix="kem-limits-") as tmp, PostgresServer() as pg:
        # the shared check's own cost, in process
        store = open_store(url=pg.fresh_url("micro"), home=tmp)
        buckets = store.shared_limits()
        took = []
        for _ in range(300):
            t0 = time.perf_counter()
            taken = buckets.take("k-micro", 10**7, None, 64, 10)
            buckets.release(taken.lease)
            took.append((time.perf_counter() - t0) * 1000)
        store.close()
        for shared in (True, False):
            url = pg.fresh_url("shared" if shared else "local")
            add_keys(url, args.rpm)
            env = {} if shared else {"KEM_SHARED_LIMITS": "false"}
            reps = [Replica(f"{'s' if shared else 'l'}{i}", Path(tmp), url, ["--keys", "store"], env)
                    for i in range(args.replicas)]
            try:
                for r in reps:
                    r.start()
                for r in reps:
                    r.wait()
                res = hammer(reps, args.seconds, args.clients)
                lat = {}
                if shared:
                    for _ in range(2):  # interleaved rounds
                        for key in ("free", "cost"):
                            lat.setdefault(key, []).extend(latency(reps[0], key, args.latency // 2))
                rows.append((shared, res, lat))
                print(("shared" if shared else "per process"), res, flush=True)  # noqa: T201
            finally:
                for r in reps:
                    r.stop()

    print(f"\nkey limited to R = {args.rpm} rpm, {args.replicas} replicas, {args.seconds:.0f} s of load, "
          f"{args.clients} client threads, loadavg {os.getloadavg()[0]:.1f}\n")
    print("| limits | accepted | accepted / R | attempts | responses |")
    print("|---|---:|---:|---:|---|")
    for shared, res, _ in rows:
        acc = int(res["accepted"])  # type: ignore[call-overload]
        print(f"| {'shared (database)' if shared else 'per process'} | {acc} | {acc / args.rpm:.2f} | "
              f"{res['attempts']} | {res['codes']} |")
    lat = rows[0][2]
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    print(f"\ncost: SharedBuckets.take + release in process p50 {statistics.median(took):.2f} ms "
          f"(p95 {statistics.quantiles(took, n=20)[18]:.2f} ms); a completion through a replica: key with limits "
          f"p50 {p50['cost']:.1f} ms vs no limits {p50['free']:.1f} ms ({p50['cost'] - p50['free']:+.1f} ms)")


if __name__ == "__main__":
    main()
