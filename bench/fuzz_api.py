"""Fuzz kem serve's HTTP API with thousands of property-based cases (tests/api_fuzz.py) and print a table
of response codes; any 5xx or hang fails the run (exit 1).

    .venv/bin/python bench/fuzz_api.py --examples 2000

Starts its own ``kem serve`` (transformers engine, auth on, max_tokens ceiling 8) on 127.0.0.1. With
``--upstream``, the fuzzed server is kem in upstream mode in front of a second ``kem serve`` (U, which
checks every field as strictly as kem does): a body U refuses is one kem forwarded without catching
what is wrong with it, so U's 4xx on the completion routes count the unvalidated forwards.

    .venv/bin/python bench/fuzz_api.py --examples 2000 --upstream
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=None, help="derandomised run (the suite's cases) when given")
    ap.add_argument("--upstream", action="store_true", help="fuzz kem in upstream mode in front of another kem")
    args = ap.parse_args()
    import httpx

    from tests.api_fuzz import fuzz
    from tests.conftest import kem_server

    keys = {"none": None, "alice": "sk-f-alice", "bob": "sk-f-bob", "admin": "sk-f-admin", "bad": "sk-wrong"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "keys.txt").write_text("sk-f-alice alice\nsk-f-bob bob\nsk-f-admin * admin\n")
        env = {"KEM_MAX_TOKENS_CEILING": "8", "KEM_MAX_BODY_BYTES": "1048576"}
        upstream = None
        extra: list[str] = []
        if args.upstream:
            upstream = kem_server(tmp, "upstream", env=env).start()
            upstream.wait()
            extra = ["--upstream", upstream.url, "--model", "smollm2-135m-instruct"]
        server = kem_server(tmp, "fuzz", "--keys", str(tmp / "keys.txt"), *extra, env=env).start()
        try:
            server.wait()
            with httpx.Client(base_url=server.url, headers={"authorization": "Bearer sk-f-admin"}) as admin:
                ids = [admin.post("/v1/edits", json={"subject": f"Zorbex {i}", "prompt": "The CEO of {} is",
                                                     "target_new": "Carla Diaz", "namespace": ns}).json()["id"]
                       for i, ns in enumerate(("alice", "bob"))]
            stats: Counter[int] = Counter()
            t0 = time.perf_counter()
            failure = None
            try:
                fuzz(server.url, keys, ids, args.examples, stats, seed=args.seed)
            except Exception as exc:  # the falsifying example is in the message
                failure = exc
            seconds = time.perf_counter() - t0
            alive = httpx.get(server.url + "/healthz", timeout=10).status_code == 200
            forwarded: Counter[str] = Counter()
            if upstream is not None:  # what reached U, by status: a 4xx there is a body kem let through
                for line in httpx.get(upstream.url + "/metrics", timeout=30).text.splitlines():
                    if line.startswith("kem_requests_total") and "completions" in line:
                        status = line.split('status="')[1].split('"')[0]
                        forwarded[status] += int(float(line.rsplit(" ", 1)[1]))
        finally:
            server.stop()
            if upstream is not None:
                upstream.stop()
    total = sum(stats.values())
    print("| status | responses | share |\n|---|---:|---:|")
    for code in sorted(stats):
        print(f"| {code} | {stats[code]} | {stats[code] / max(total, 1):.1%} |")
    print(f"\n{total} requests in {seconds:.0f} s; >= 500: {sum(v for c, v in stats.items() if c >= 500)}; "
          f"server alive after: {alive}")
    if args.upstream:
        bad = sum(v for k, v in forwarded.items() if k.startswith("4") and k not in ("404", "429"))
        print(f"forwarded to the upstream, by its status: {dict(sorted(forwarded.items()))}; refused there "
              f"(an unvalidated field reached it): {bad}")
    if failure is not None or not alive:
        print(f"FAILED: {failure}")
        sys.exit(1)


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
