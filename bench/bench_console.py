"""The console at scale: one namespace of ``--n`` edits (default 100,000) in a real SQLite store and FAISS
index, and the p50 / p95 time of the console's pages against the API's own list, in the same process
and over the same in-process HTTP transport (``fastapi.testclient``), so the ratio is what the console
adds to the service layer the API already uses.

Rows: a page of the edits list (first and deep), the full-text search (``q=``, few and many matches,
and a subject), the nearest-neighbour search through the index, and the playground's overhead beyond
the model calls (the playground's POST against the two API completions it stands for, no edits and
with kem, timed back to back).

The edits are CounterFact-style facts made up by the bench (subject ``Company N``); their retrieval
vectors are random unit vectors stored with them (the index is built from the store's saved vectors,
as ``kem`` rebuilds it), so the nearest search runs on a real 100,000-edit FAISS index without
embedding 100,000 texts first; the query is embedded for real.

    .venv/bin/python bench/bench_console.py [--n 100000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="edits in the namespace")
    ap.add_argument("--repeat", type=int, default=30, help="timed requests per row")
    ap.add_argument("--playground", type=int, default=5, help="timed playground requests")
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from kem.edit import Edit
    from kem.editor import KnowledgeEditor
    from kem.server.app import build_app
    from kem.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="kem-bench-console-"))
    settings = Settings(home=tmp / "home")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with KnowledgeEditor.open(settings=settings) as ke:
        dim, name = ke.memory.embedder.dim, ke.memory.embedder.name
        batch = 5_000
        for start in range(0, args.n, batch):
            edits = [Edit(subject=f"Company {i}", prompt="The CEO of {} is", target_new=f"Person {i}",
                          paraphrases=[f"Who runs Company {i}?"]) for i in range(start, min(args.n, start + batch))]
            vecs = []
            for e in edits:
                v = rng.standard_normal((len(e.retrieval_keys()), dim)).astype(np.float32)
                vecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
            ke.store.add_many(edits, vecs, name)
        ke.memory.rebuild(progress=False)
    print(f"stored and indexed {args.n:,} edits in {time.perf_counter() - t0:.0f} s")

    ke = KnowledgeEditor.open(settings=settings)
    app = build_app(settings, ke, ke.generator)
    c = TestClient(app)
    n = args.n
    rows: list[tuple[str, str, list[float], list[float] | None]] = []

    def get(path: str, **params):
        def call():
            r = c.get(path, params=params)
            assert r.status_code == 200, r.text[:300]
        return call

    pairs = [
        ("first page", {"offset": 0}, {"offset": 0}),
        ("deep page (offset n/2)", {"offset": n // 2}, {"offset": n // 2}),
        ("search, few matches (q='Company 4242')", {"q": "Company 4242"}, {"q": "Company 4242"}),
        ("search, many matches (q='Person 1')", {"q": "Person 1"}, {"q": "Person 1"}),
        ("search, last page of many (q='Person 1')", {"q": "Person 1", "offset": 11_000}, {"q": "Person 1", "offset": 11_000}),
        ("subject filter", {"subject": "company 777"}, {"subject": "company 777"}),
    ]
    for label, api_params, console_params in pairs:
        api = timed(get("/v1/edits", limit=25, **api_params), args.repeat)
        console = timed(get("/console/edits", **console_params), args.repeat)
        rows.append((label, "/console/edits", console, api))
    near_api = timed(get("/v1/edits/search", q="Who is the chief executive of Company 4242?", k=25), args.repeat)
    near = timed(get("/console/edits", q="Who is the chief executive of Company 4242?", mode="nearest"), args.repeat)
    rows.append(("nearest search (index, k=25)", "/console/edits?mode=nearest", near, near_api))

    # the playground against the two API calls it makes, back to back
    ke.add(Edit(subject="Kem Corporation", prompt="The CEO of {} is", target_new="Zora Quill"))
    body = {"model": "default", "prompt": "The CEO of Kem Corporation is", "max_tokens": settings.max_new_tokens}

    def api_pair():
        for h in ({"x-kem-no-edits": "1"}, {}):
            assert c.post("/v1/completions", json=body, headers=h).status_code == 200

    import re

    token = re.search(r'name="csrf" value="([0-9a-f]+)"', c.get("/console/playground").text).group(1)

    console_ms: list[float] = []

    def playground():
        r = c.post("/console/playground", data={"kind": "completion", "text": body["prompt"], "csrf": token})
        assert r.status_code == 200 and "Zora Quill" in r.text, r.text[-3000:]
        timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
        console_ms.append(float(timing["console"]))

    pair_ms, play_ms = [], []
    api_pair(), playground()
    console_ms.clear()
    for _ in range(args.playground):  # interleaved, so both see the same machine load
        for fn, into in ((api_pair, pair_ms), (playground, play_ms)):
            t0 = time.perf_counter()
            fn()
            into.append((time.perf_counter() - t0) * 1000)
    ke.close()

    def p(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]

    print(f"\n{n:,} edits in one namespace, SQLite + FAISS, {args.repeat} requests per row (ms, in-process HTTP)\n")
    print("| request | console p50 | console p95 | API p50 (same query) | console / API |")
    print("|---|---:|---:|---:|---:|")
    for label, _, console, api in rows:
        cp50, ap50 = statistics.median(console), statistics.median(api) if api else float("nan")
        print(f"| {label} | {cp50:.1f} | {p(console, 95):.1f} | {ap50:.1f} | {cp50 / ap50:.2f}x |")
    over = [a - b for a, b in zip(play_ms, pair_ms, strict=True)]
    print(f"\nplayground (2 answers): p50 {statistics.median(play_ms):.0f} ms; the two API completions back to back: "
          f"p50 {statistics.median(pair_ms):.0f} ms; overhead p50 {statistics.median(over):+.1f} ms "
          f"({args.playground} interleaved pairs, wall clock: noisy on a shared machine)")
    print(f"playground's own work beyond the serving calls (its Server-Timing 'console' part: form, versions list, "
          f"rendering): p50 {statistics.median(console_ms):.1f} ms, max {max(console_ms):.1f} ms")


if __name__ == "__main__":
    main()
