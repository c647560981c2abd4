"""Hot swap across replicas (issue 13, "consolidation across replicas"): the time from a version's publish to
every ``kem serve --model-version current`` replica serving it.

    .venv/bin/python bench/bench_hot_swap.py [--replicas 2] [--publishes 5]

Everything is real: a throw-away PostgreSQL 15 (tests/postgres_server.py, ``fsync=on``), ``--replicas``
``kem serve`` processes on 127.0.0.1 (the in-process transformers engine with SmolLM2-135M, one torch
thread each, separate ``--home``, one ``--store`` and one shared ``KEM_MODELS_DIR``), and this process as
the publisher (another machine, as far as the replicas know). Each publish is
:meth:`kem.versions.VersionStore.publish` of the base model's files (linked: they stand in for
consolidated weights; the replica loads them as it would a real version). Its clock starts when
``publish`` returns (the database commit sent the notification) and stops when a replica's ``/healthz``
names the new version (polled every 10 ms). Two clients per replica send completions (``max_tokens=2``)
throughout: every one must succeed. Last, one rollback with ``kem models rollback`` (a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def start_replica(i: int, url: str, models: Path, tmp: Path) -> Any:
    from tests.conftest import ServerProcess, free_port

    port = free_port()
    args = ["-m", "kem.server", "serve", "--port", str(port), "--home", str(tmp / f"replica-{i}"), "--store", url,
            "--model-version", "current", "--threads", "1", "--log-level", "warning"]
    env = {"KEM_MODELS_DIR": str(models), "KEM_DEVICE": "cpu"}
    return ServerProcess(args, port, tmp / f"replica-{i}.log", env=env).start()


def wait_serving(replica: Any, version: str, t0: float, timeout: float = 120.0) -> tuple[float, dict[str, Any]]:
    while True:
        body = httpx.get(replica.url + "/healthz", timeout=10).json()
        if body["model"].endswith(f"@{version}"):
            return time.perf_counter() - t0, body
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{replica.url} still serves {body['model']} {timeout:.0f} s after {version}")
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--publishes", type=int, default=5)
    args = ap.parse_args()

    from kem.models import resolve_model
    from kem.settings import Settings
    from kem.versions import versions_for
    from tests.postgres_server import PostgresServer

    tmp = Path(tempfile.mkdtemp(prefix="kem-bench-swap-"))
    models = tmp / "shared-models"
    with PostgresServer(fsync=True) as pg:
        url = pg.fresh_url("bench")
        settings = Settings(home=tmp / "publisher", store=url, models_dir=models, device="cpu")
        folder = resolve_model(settings.model, settings.cache_dir)
        replicas = [start_replica(i, url, models, tmp) for i in range(args.replicas)]
        stop, errors, ok = threading.Event(), [], [0]

        def client(r: Any) -> None:
            with httpx.Client(base_url=r.url, timeout=120) as c:
                while not stop.is_set():
                    try:
                        resp = c.post("/v1/completions", json={"model": "default", "prompt": "The capital of Italy is",
                                                              "max_tokens": 2})
                        if resp.status_code == 200:
                            ok[0] += 1
                        else:
                            errors.append(f"{resp.status_code} {resp.text[:200]}")
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))

        try:
            for r in replicas:
                r.wait(300)
            clients = [threading.Thread(target=client, args=(r,)) for r in replicas for _ in range(2)]
            for t in clients:
                t.start()
            rows = []

            def write(dest: Path) -> None:
                for f in folder.iterdir():
                    (dest / f.name).symlink_to(f)

            parent = None
            for _ in range(args.publishes):
                with versions_for(settings) as vs:
                    t_pub = time.perf_counter()
                    man = vs.publish({"base": settings.model, "parent": parent, "method": "memit"}, write)
                    t0 = time.perf_counter()
                parent = man.version
                for i, r in enumerate(replicas):
                    took, body = wait_serving(r, man.version, t0)
                    rows.append({"version": man.version, "replica": i, "publish_s": round(t0 - t_pub, 3),
                                 "served_after_s": round(took, 3),
                                 "replica_swap_s": body["versions"]["last_swap_s"]})
                    print(json.dumps(rows[-1]), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "kem", "models", "rollback", "v1", "--store", url,
                                   "--home", str(tmp / "ops")], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "KEM_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1"})
            t_cli = time.perf_counter() - t0
            assert proc.returncode == 0, proc.stderr
            back = [wait_serving(r, "v1", t0)[0] for r in replicas]
            stop.set()
            for t in clients:
                t.join(120)
        finally:
            stop.set()
            for r in replicas:
                r.stop()
    served = [r["served_after_s"] for r in rows]
    print(f"\npublish -> served ({len(served)} samples, {args.replicas} replicas): p50 {statistics.median(served):.2f} s, "
          f"max {max(served):.2f} s; the replica's own swap (notification -> serving) p50 "
          f"{statistics.median(r['replica_swap_s'] for r in rows):.2f} s")
    print(f"kem models rollback v1: the command took {t_cli:.2f} s; replicas serving v1 {', '.join(f'{b:.2f}' for b in back)} "
          "s after it started")
    print(f"completions during the swaps: {ok[0]} ok, {len(errors)} failed {errors[:3]}")
    print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
