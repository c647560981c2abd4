"""Added latency of ``kem serve --upstream`` over calling the engine directly, p50/p99, at 1 and 16
concurrent clients, with 10k edits stored.

    .venv/bin/python bench/bench_serving.py                      # starts vLLM (.venv-vllm) and kem
    .venv/bin/python bench/bench_serving.py --engine-url http://127.0.0.1:8000   # an engine already up

Out-of-scope requests: the same request to the engine and through kem. In-scope requests: through
kem vs. the *rewritten* request sent to the engine directly, so the longer prompt's generation cost
is excluded and what is left is kem's own work (embedding, retrieval, scope, composition, proxying).
Requests to the engine and to kem alternate, so load on a shared machine hits both alike.

``--backends torch,auto`` (the default) runs one kem server per embedder backend against the same
engine, in one run: the old path (sentence-transformers on torch) and kem's default, each with its
own store of the same edits (``--home``, and ``--home``-<backend> for the others).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ServerProcess, free_port, kem_server  # noqa: E402

RELATIONS = ["The CEO of {} is", "The headquarters of {} are in", "{} was founded in the year",
             "The mother tongue of {} is", "{} plays the instrument", "The capital of {} is"]
WORDS = ["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lumen", "meadow", "nimbus", "onyx", "prairie", "quartz", "raven", "sierra", "tundra"]
OUT_OF_SCOPE = ["The capital of France is", "Water boils at", "The largest planet in the solar system is",
                "The author of Hamlet is", "The chemical symbol for gold is", "The tallest mountain on Earth is",
                "The speed of light is", "The first president of the United States was"]


def synthetic_edits(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        subject = f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()} {i}"
        out.append({"subject": subject, "prompt": RELATIONS[i % len(RELATIONS)],
                    "target_new": f"{rng.choice(WORDS).title()} {rng.choice(WORDS)}", "source": "bench"})
    return out


def prepare_home(home: Path, n: int, backend: str = "auto") -> list[dict]:
    """A store with ``n`` synthetic edits embedded by ``backend`` (reused when it already holds them)."""
    from kem import KnowledgeEditor
    from kem.settings import Settings

    edits = synthetic_edits(n)
    with KnowledgeEditor.open(home, settings=Settings(embedder_backend=backend)) as ke:
        have = ke.store.count()
        if have != n:
            t0 = time.perf_counter()
            ke.add_many(edits[have:], progress=True, batch_size=1000)
            print(f"stored {n - have} edits in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return edits


def backend_home(home: Path, backend: str) -> Path:
    """One store per embedder backend (their key vectors differ; two servers must not share an index)."""
    return home if backend == "torch" else home.with_name(f"{home.name}-{backend}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


async def measure(pairs: list[tuple[str, dict, str, dict]], concurrency: int) -> dict:
    """Send each ``(engine_url, engine_body, kem_url, kem_body)`` pair, alternating which goes first."""
    lat: dict[str, list[float]] = {"engine": [], "kem": []}
    errors = {"engine": 0, "kem": 0}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:

        async def one(kind: str, url: str, body: dict) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, json=body)
                r.raise_for_status()
                lat[kind].append(time.perf_counter() - t0)
            except httpx.HTTPError:
                errors[kind] += 1

        async def pair(i: int, p: tuple[str, dict, str, dict]) -> None:
            async with sem:
                first = [("engine", p[0], p[1]), ("kem", p[2], p[3])]
                for kind, url, body in (first if i % 2 else first[::-1]):
                    await one(kind, url, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(pair(i, p) for i, p in enumerate(pairs)))
        wall = time.perf_counter() - t0
    return {"lat": lat, "errors": errors, "rps": 2 * len(pairs) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-url", help="An OpenAI-compatible engine already running (default: start vLLM).")
    ap.add_argument("--edits", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=32, help="Request pairs per scope at concurrency 1.")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--home", type=Path, default=Path("~/.cache/kem/bench-serving-home").expanduser(),
                    help="Edit store with the synthetic edits (built once, then reused).")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument("--backends", default="torch,auto",
                    help="Embedder backends to compare, one kem server each (torch: the old path; auto: kem's default).")
    args = ap.parse_args()

    import os

    from kem import KnowledgeEditor
    from kem.models import resolve_model
    from kem.settings import Settings

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    print(f"load average at the start: {os.getloadavg()} ({os.cpu_count()} cores)", file=sys.stderr)
    edits = []
    for b in backends:
        edits = prepare_home(backend_home(args.home, b), args.edits, b)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    procs: list[ServerProcess] = []
    retrieval_ms: dict[str, float] = {}
    try:
        engine_url = args.engine_url
        if engine_url is None:
            vpy = ROOT / ".venv-vllm" / "bin" / "python"
            if not vpy.exists():
                sys.exit(f"{vpy} is missing: run scripts/install_vllm.sh, or pass --engine-url")
            port = free_port()
            folder = resolve_model("smollm2-135m-instruct", Settings().cache_dir)
            v = ServerProcess(["-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host",
                               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
                               "--enforce-eager", "--served-model-name", "smollm2"], port, tmp / "vllm.log",
                              python=str(vpy), env={"VLLM_CPU_KVCACHE_SPACE": "2"}, health="/health")
            procs.append(v.start())
            v.wait(timeout=900)
            engine_url = v.url
        model = httpx.get(engine_url + "/v1/models").json()["data"][0]["id"]
        servers = {}
        for b in backends:
            k = kem_server(tmp, f"kem-{b}", "--upstream", engine_url, env={"KEM_EMBEDDER_BACKEND": b})
            k.args[k.args.index("--home") + 1] = str(backend_home(args.home, b))
            procs.append(k.start())
            k.wait(timeout=600)
            servers[b] = k

        rows = []
        base = {"model": model, "max_tokens": args.max_tokens, "temperature": 0}
        for conc in args.concurrency:
            n = args.requests * max(1, conc // 2)
            rng = random.Random(conc)
            oos = [OUT_OF_SCOPE[i % len(OUT_OF_SCOPE)] for i in range(n)]
            ins = [e["prompt"].replace("{}", e["subject"]) for e in rng.sample(edits, n)]
            for b, k in servers.items():
                # the same store as the server, to build the rewritten requests
                ke = KnowledgeEditor.open(backend_home(args.home, b), settings=Settings(embedder_backend=b))
                pairs_out = [(engine_url + "/v1/completions", {**base, "prompt": p},
                              k.url + "/v1/completions", {**base, "prompt": p}) for p in oos]
                pairs_in = []
                for p in ins:
                    rw = ke.rewrite_prompt(p)
                    body = {**base, "prompt": rw.request, **({"stop": list(rw.stop)} if rw.stop else {})}
                    pairs_in.append((engine_url + "/v1/completions", body, k.url + "/v1/completions",
                                     {**base, "prompt": p}))
                ke.close()
                asyncio.run(measure(pairs_out[:4], conc))  # warm-up
                for scope, pairs in (("out-of-scope", pairs_out), ("in-scope", pairs_in)):
                    r = asyncio.run(measure(pairs, conc))
                    e, m = r["lat"]["engine"], r["lat"]["kem"]
                    rows.append({"backend": b, "scope": scope, "concurrency": conc, "n": len(pairs),
                                 "engine_p50_ms": 1e3 * statistics.median(e), "engine_p99_ms": 1e3 * pct(e, 0.99),
                                 "kem_p50_ms": 1e3 * statistics.median(m), "kem_p99_ms": 1e3 * pct(m, 0.99),
                                 "errors": r["errors"]["kem"] + r["errors"]["engine"], "rps": r["rps"]})
        for b, k in servers.items():
            metrics = httpx.get(k.url + "/metrics").text
            ret = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines()
                   if ln.startswith("kem_retrieval_seconds_sum") or ln.startswith("kem_retrieval_seconds_count")}
            retrieval_ms[b] = 1e3 * ret["kem_retrieval_seconds_sum"] / max(1.0, ret["kem_retrieval_seconds_count"])
    finally:
        for p in reversed(procs):
            p.stop()

    print(f"\nkem serve --upstream {model} ({args.edits} edits stored, max_tokens={args.max_tokens}); mean kem "
          "retrieval per request (embed + search + scope, from /metrics): "
          + ", ".join(f"{b} {ms:.1f} ms" for b, ms in retrieval_ms.items()) + "\n")
    head = ("| embedder | scope | clients | n | engine p50 | engine p99 | kem p50 | kem p99 | added p50 | kem/engine p50 "
            "| req/s | errors |")
    print(head)
    print("|---" * 12 + "|")
    for r in rows:
        added = r["kem_p50_ms"] - r["engine_p50_ms"]
        print(f"| {r['backend']} | {r['scope']} | {r['concurrency']} | {r['n']} | {r['engine_p50_ms']:.0f} ms "
              f"| {r['engine_p99_ms']:.0f} ms | {r['kem_p50_ms']:.0f} ms | {r['kem_p99_ms']:.0f} ms | {added:+.1f} ms"
              f" | {r['kem_p50_ms'] / r['engine_p50_ms']:.3f} | {r['rps']:.1f} | {r['errors']} |")
    if len(backends) >= 2:
        old, new = backends[0], backends[-1]
        print(f"\nadded p50, {old} -> {new} (same run):")
        for r in rows:
            if r["backend"] != new:
                continue
            o = next(x for x in rows if x["backend"] == old and x["scope"] == r["scope"]
                     and x["concurrency"] == r["concurrency"])
            a_old, a_new = o["kem_p50_ms"] - o["engine_p50_ms"], r["kem_p50_ms"] - r["engine_p50_ms"]
            print(f"- {r['scope']}, {r['concurrency']} clients: {a_old:+.1f} ms -> {a_new:+.1f} ms")
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "retrieval_ms": retrieval_ms}, indent=2))


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
