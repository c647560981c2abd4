"""Edit store write throughput: PostgreSQL vs SQLite (issue 13's goal: PostgreSQL bulk import without
embedding >= 0.5x SQLite's), plus single-edit writes and the read paths a replica uses.

    .venv/bin/python bench/bench_store.py [--n 10000] [--singles 200] [--url postgresql://...]

Without ``--url`` it starts a throw-away PostgreSQL 15 (tests/postgres_server.py) with ``fsync=on``, as in
production, on this machine's disk; SQLite runs with its default ``synchronous=FULL``. The edits are the
first N CounterFact records (../shared/data), built once and given to both stores' ``add_many`` (one
transaction each). Prints a table with the ratio to SQLite and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def edits(n: int, tag: str) -> list:
    from kem.edit import Edit

    recs = json.loads(DATA.read_text())
    out = []
    for i in range(n):
        r = recs[i % len(recs)]
        subject = r["subject"] if i < len(recs) else f"{r['subject']} {i // len(recs)}"
        out.append(Edit(subject=subject, prompt=r["prompt"], target_new=r["target_new"], target_true=r["ground_truth"],
                        paraphrases=[r["rephrase_prompt"]], namespace="bench", source=f"{tag}:{i}"))
    return out


def run(store, n: int, singles: int) -> dict[str, float]:
    batch = edits(n, "bulk")
    t0 = time.perf_counter()
    store.add_many(batch)
    bulk = time.perf_counter() - t0
    one = edits(singles, "single")
    t0 = time.perf_counter()
    for e in one:
        store.add(e.model_copy(update={"namespace": "singles"}))
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    changes = store.changes_since(0)
    replay = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(200):
        store.revision()
    rev = (time.perf_counter() - t0) / 200
    assert store.count() == n + singles and len(changes) >= n + singles
    return {"bulk_per_s": n / bulk, "bulk_s": bulk, "single_ms": 1000 * single / singles,
            "replay_s": replay, "revision_ms": 1000 * rev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="edits in the bulk add_many")
    ap.add_argument("--singles", type=int, default=200, help="one-edit adds (latency)")
    ap.add_argument("--url", help="an existing PostgreSQL (a fresh schema is used and dropped)")
    args = ap.parse_args()

    from kem.stores import open_store
    from kem.stores.sqlite import SQLiteStore

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kem-bench-store-") as tmp:
        s = SQLiteStore(Path(tmp) / "edits.sqlite")
        results["sqlite (synchronous=FULL)"] = run(s, args.n, args.singles)
        s.close()
        server = None
        url = args.url
        if url is None:
            from tests.postgres_server import PostgresServer

            server = PostgresServer(fsync=True).start()
            url = server.url
        schema = f"bench_{os.getpid()}"
        try:
            p = open_store(url=f"{url}{'&' if '?' in url else '?'}schema={schema}", home=tmp)
            results["postgresql (fsync=on)"] = run(p, args.n, args.singles)
            p.close()
        finally:
            if server is not None:
                server.close()
            else:
                import psycopg

                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")

    base = results["sqlite (synchronous=FULL)"]
    load = os.getloadavg()
    print(f"\nEdit store writes: bulk add_many of {args.n} CounterFact edits (no embeddings, one transaction), "
          f"{args.singles} single adds; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs\n")
    print("| store | bulk edits/s | bulk s | ratio to SQLite | single add ms | changes_since(0) s | revision() ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bulk_per_s']:,.0f} | {r['bulk_s']:.2f} | {r['bulk_per_s'] / base['bulk_per_s']:.2f}x | "
              f"{r['single_ms']:.2f} | {r['replay_s']:.2f} | {r['revision_ms']:.3f} |")
    ratio = results["postgresql (fsync=on)"]["bulk_per_s"] / base["bulk_per_s"]
    print(f"\ngoal: PostgreSQL bulk >= 0.5x SQLite: {'met' if ratio >= 0.5 else 'MISSED'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
