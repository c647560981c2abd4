"""One tenant cannot starve another (issue 12): bob's 2-token chat latency, idle and while alice sends
max-size requests in a loop (a prompt filling half the context, max_tokens up to the ceiling), through a
real ``kem serve`` (transformers engine) on 127.0.0.1. Prints a table with the ratio to the idle p50.

    .venv/bin/python bench/bench_fairness.py [--n 15] [--alice-threads 2] [--prompt-tokens 4000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT = {"model": "default", "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "user", "content": "Name one primary color."}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15, help="bob's requests per phase")
    ap.add_argument("--alice-threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=4000, help="about this many tokens in alice's prompts")
    ap.add_argument("--max-tokens", type=int, default=4096, help="alice's max_tokens (the default ceiling)")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between alice's start and bob's measurement (5: during her prefill; "
                         "60: during her decoding)")
    ap.add_argument("--threads", type=int, default=None, help="kem serve --threads (torch threads; default: torch's)")
    ap.add_argument("--unique-prompts", action="store_true",
                    help="a different prompt for each of alice's requests (vLLM's prefix cache would otherwise "
                         "serve her repeated prompt, so she would prefill only once)")
    ap.add_argument("--keep-log", type=Path, default=None, help="copy the server's log here at the end")
    ap.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                    help="vllm: kem serve --engine vllm from .venv-vllm (KEM_VLLM_PYTHON)")
    ap.add_argument("--vllm-batched-tokens", type=int, default=None,
                    help="vLLM's max_num_batched_tokens (its chunked-prefill budget per step; default vLLM's)")
    args = ap.parse_args()
    import httpx

    from tests.conftest import kem_server

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "keys.txt").write_text("sk-b-alice alice\nsk-b-bob bob\n")
        extra = ["--threads", str(args.threads)] if args.threads else []
        if args.engine == "vllm":
            import os

            from kem.models import resolve_model
            from kem.settings import Settings
            from tests.conftest import ServerProcess, free_port

            py = os.environ.get("KEM_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
            env = {"KEM_REQUEST_TIMEOUT": "3600", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
            if args.vllm_batched_tokens:
                env["KEM_VLLM_MAX_NUM_BATCHED_TOKENS"] = str(args.vllm_batched_tokens)
            port = free_port()
            server = ServerProcess(["-m", "kem.server", "serve", "--engine", "vllm", "--model",
                                    str(resolve_model("smollm2-135m-instruct", Settings().cache_dir)), "--port",
                                    str(port), "--home", str(tmp / "home"), "--keys", str(tmp / "keys.txt"),
                                    "--log-level", "warning", *extra], port, tmp / "fair.log", python=py, env=env).start()
        else:
            server = kem_server(tmp, "fair", "--keys", str(tmp / "keys.txt"), *extra,
                                env={"KEM_REQUEST_TIMEOUT": "3600"}).start()
        try:
            server.wait(timeout=900)
            bob = httpx.Client(base_url=server.url, headers={"authorization": "Bearer sk-b-bob"}, timeout=120)

            def phase() -> list[float]:
                out = []
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    bob.post("/v1/chat/completions", json=CHAT).raise_for_status()
                    out.append(time.perf_counter() - t0)
                return out

            phase()  # warm-up
            idle = phase()
            stop = threading.Event()
            alice_done: list[int] = []
            alice_errors: list[str] = []

            def alice() -> None:
                c = httpx.Client(base_url=server.url, headers={"authorization": "Bearer sk-b-alice"}, timeout=3600)
                prompt = "Counting: " + ", ".join(str(i) for i in range(int(args.prompt_tokens / 5.5))) + ","  # ~5.5 tokens a number
                n = 0
                while not stop.is_set():
                    if args.unique_prompts:  # a new first token: nothing of it is in the prefix cache
                        n += 1
                        prompt = f"{threading.get_ident() % 997}.{n} " + prompt.split(" ", 1)[1]
                    r = c.post("/v1/completions", json={"model": "default", "prompt": prompt,
                                                        "max_tokens": args.max_tokens, "temperature": 0})
                    if r.status_code == 200:
                        alice_done.append(1)
                    elif not stop.is_set():  # (the server stopping at the end cuts her last request)
                        alice_errors.append(r.text[:200])
                        return

            threads = [threading.Thread(target=alice, daemon=True) for _ in range(args.alice_threads)]
            for t in threads:
                t.start()
            time.sleep(args.settle)  # alice's requests are prefilling (or decoding, after ~40 s) now
            loaded = phase()
            stop.set()
        finally:
            server.stop()
            if args.keep_log is not None:
                import shutil

                shutil.copy(server.log_path, args.keep_log)
    p50i, p50l = statistics.median(idle), statistics.median(loaded)
    print("| bob's 2-token chat | p50 s | p90 s | max s | ratio to idle p50 |\n|---|---:|---:|---:|---:|")
    for name, xs in (("idle", idle), (f"alice: {args.alice_threads} x max-size loop, from {args.settle:.0f} s", loaded)):
        q = statistics.quantiles(xs, n=10)
        print(f"| {name} | {statistics.median(xs):.3f} | {q[-1]:.3f} | {max(xs):.3f} | {statistics.median(xs) / p50i:.2f}x |")
    print(f"\nalice: prompt ~{args.prompt_tokens} tokens, max_tokens {args.max_tokens}, "
          f"{args.alice_threads} threads, running the whole time: {not alice_errors}; errors: {alice_errors[:1]}")
    slow = max(range(len(loaded)), key=loaded.__getitem__)
    print(f"bob's slowest loaded request: #{slow + 1} of {len(loaded)}, {loaded[slow]:.3f} s "
          f"(sent {sum(loaded[:slow]) + args.settle:.1f} s after alice started)")
    print(f"goal: loaded p50 <= 2x idle p50 -> {'met' if p50l <= 2 * p50i and not alice_errors else 'NOT met'}")


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()  # before torch loads
    main()
