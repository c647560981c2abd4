"""Two kem replicas on one PostgreSQL (issue 13): cross-replica staleness, mixed load over two tenants, kill -9
of a replica during a bulk import, and a PostgreSQL restart under load.

    .venv/bin/python bench/bench_scale_out.py [--n 200] [--duration 60] [--clients 8] [--import-size 1000]

Everything is real: a throw-away PostgreSQL 15 (tests/postgres_server.py, ``fsync=on``) and two
``kem serve`` processes on 127.0.0.1 (the in-process transformers engine with SmolLM2-135M, one torch
thread each, separate ``--home``, the same ``--store``). Phases:

1. **staleness**: ``--n`` edits written one after another through A's HTTP API; after each, B's
   ``/healthz`` ``index_revision`` is polled (every 2 ms) until B has applied it. Staleness is the time
   from A's 201 to B's index holding the edit, with no request to B other than the polls.
2. **load**: ``--clients`` threads for ``--duration`` s, half per tenant (namespaces ``tenant0``/``tenant1``),
   alternating replicas; a quarter of the operations add an edit, the rest ask (half chat completions,
   half completions, ``max_tokens=1``) about an edit the thread wrote at least 1 s before on either replica. Counts errors,
   cross-tenant edits applied (an edit of the other tenant in the ``kem`` field: a leak), and reads that
   did not apply the expected edit; afterwards every acknowledged edit is in the store and both indexes
   are at the store's revision (0 lost).
3. **kill -9 during a bulk import**: ``--import-size`` edits posted to A's ``/v1/edits/import`` (one
   transaction) and A killed halfway through (embedding), inside its write transaction, and right after
   the commit: the namespace holds all of them or none, B serves a committed import, and A restarts and
   catches up.
4. **PostgreSQL restart under load**: 4 clients on both replicas; the database is stopped (``pg_ctl stop
   -m fast``) for ``--outage`` s and started again. Requests during the outage must end with a 503
   ``store_unavailable`` within the store timeout (3 s in ``kem serve``) plus the request's own time,
   none may hang, and service must resume by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
PY = sys.executable
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
RECORDS: list[dict[str, Any]] = []


def record(i: int, ns: str) -> dict[str, Any]:
    r = RECORDS[i % len(RECORDS)]
    return {"subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"], "namespace": ns}


def question(rec: dict[str, Any]) -> str:
    return rec["prompt"].replace("{}", rec["subject"])


def loadavg() -> float:
    return round(os.getloadavg()[0], 1)


class Replica:
    """One ``kem serve`` process on 127.0.0.1 (own process group, own home, the shared store)."""

    def __init__(self, name: str, tmp: Path, store: str, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        from tests.postgres_server import free_port

        self.name, self.store, self.port = name, store, free_port()
        self.extra, self.env = list(extra or []), dict(env or {})
        self.home, self.log = tmp / f"{name}-home", tmp / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "kem.server", "serve", "--port", str(self.port), "--home", str(self.home), "--store",
                 self.store, "--threads", "1", "--log-level", "warning", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
        return self

    def wait(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not up after {timeout} s")

    def health(self, client: httpx.Client | None = None) -> dict[str, Any]:
        return (client or httpx).get(self.url + "/healthz", timeout=10).json()  # type: ignore[no-any-return]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def until(cond: Any, timeout: float, step: float = 0.02) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ---- 1. staleness -------------------------------------------------------------------------------------
def staleness(a: Replica, b: Replica, n: int) -> dict[str, Any]:
    lat, ack = [], []
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        for i in range(n):
            t0 = time.perf_counter()
            r = ca.post("/v1/edits", json=record(i, "stale"))
            t_ack = time.perf_counter()
            assert r.status_code == 201, r.text
            ack.append(t_ack - t0)
            rev = a.health(ca)["index_revision"]  # A applied its own write before its 201
            while cb.get("/healthz").json()["index_revision"] < rev:
                if time.perf_counter() - t_ack > 30:
                    raise RuntimeError(f"B did not apply revision {rev} within 30 s")
                time.sleep(0.002)
            lat.append(time.perf_counter() - t_ack)
        applied = [e["id"] for e in cb.post("/v1/completions", headers={"x-kem-namespace": "stale"}, json={
            "model": "default", "prompt": question(record(n - 1, "stale")), "max_tokens": 1}).json()["kem"]["edits"]]
    return {"n": n, "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * pct(lat, 0.99),
            "max_ms": 1000 * max(lat), "write_p50_ms": 1000 * statistics.median(ack),
            "last_edit_applied_on_b": r.json()["id"] in applied, "load": loadavg()}


# ---- 2. mixed load over two tenants -------------------------------------------------------------------
def load(reps: list[Replica], clients: int, duration: float, first_record: int) -> dict[str, Any]:
    lock = threading.Lock()
    ids: dict[str, set[str]] = {"tenant0": set(), "tenant1": set()}
    stats = {"requests": 0, "writes": 0, "reads": 0, "errors": 0, "leaks": 0, "misses": 0, "checked_reads": 0,
             "chats": 0}
    errors: list[str] = []
    stop = time.monotonic() + duration

    def worker(i: int) -> None:
        ns = f"tenant{i % 2}"
        mine: list[tuple[float, dict[str, Any], str]] = []  # (acked at, record, id)
        k = 0
        cs = [httpx.Client(base_url=r.url, timeout=120) for r in reps]
        try:
            while time.monotonic() < stop:
                c = cs[k % len(cs)]
                k += 1
                ripe = [m for m in mine if time.monotonic() - m[0] > 1.0]
                try:
                    if k % 4 == 1 or not ripe:
                        rec = record(first_record + i * 10_000 // clients + k, ns)
                        r = c.post("/v1/edits", json=rec)
                        if r.status_code != 201:
                            raise RuntimeError(f"add {r.status_code}: {r.text[:200]}")
                        mine.append((time.monotonic(), rec, r.json()["id"]))
                        with lock:
                            ids[ns].add(r.json()["id"])
                            stats["writes"] += 1
                    else:
                        _, rec, want = ripe[k % len(ripe)]
                        chat = k % 2 == 0  # half chat, half completions
                        body: dict[str, Any] = {"model": "default", "max_tokens": 1}
                        if chat:
                            body["messages"] = [{"role": "user", "content": question(rec)}]
                        else:
                            body["prompt"] = question(rec)
                        r = c.post("/v1/chat/completions" if chat else "/v1/completions",
                                   headers={"x-kem-namespace": ns}, json=body)
                        if r.status_code != 200:
                            raise RuntimeError(f"{'chat' if chat else 'completion'} {r.status_code}: {r.text[:200]}")
                        got = {e["id"] for e in r.json()["kem"]["edits"]}
                        with lock:
                            stats["reads"] += 1
                            stats["chats"] += chat
                            stats["checked_reads"] += 1
                            other = ids["tenant1" if ns == "tenant0" else "tenant0"]
                            stats["leaks"] += len(got & other)
                            stats["misses"] += want not in got
                    with lock:
                        stats["requests"] += 1
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        stats["requests"] += 1
                        stats["errors"] += 1
                        errors.append(str(exc)[:300])
        finally:
            for c in cs:
                c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    out: dict[str, Any] = {**stats, "seconds": round(took, 1), "req_per_s": stats["requests"] / took,
                           "load": loadavg(), "error_samples": errors[:3]}
    out["acked_edits"] = sum(len(v) for v in ids.values())
    out["clients"] = clients
    out["acked"] = ids
    return out


def lost_edits(url: str, reps: list[Replica], acked: dict[str, set[str]]) -> dict[str, Any]:
    """Every acknowledged edit is in the store, and both indexes reach the store's revision."""
    from kem.stores import open_store

    store = open_store(url=url, home="/nonexistent")
    try:
        rev = store.revision()
        lost = 0
        for ns, want in acked.items():
            have = {e.id for e in store.list(ns, status=None)}
            lost += len(want - have)
        caught = [until(lambda r=r: r.health()["index_revision"] >= rev, 10) for r in reps]
    finally:
        store.close()
    return {"lost": lost, "indexes_at_store_revision": all(c is not None for c in caught)}


# ---- 3. kill -9 during a bulk import ------------------------------------------------------------------
def kill_during_import(url: str, a: Replica, b: Replica, size: int, first_record: int) -> list[dict[str, Any]]:
    """Kill A (SIGKILL to its process group) while it imports ``size`` edits: halfway through the import's
    measured duration (embedding), inside its write transaction (a backend of the database holds a
    transaction id), and right after the commit (the edits are visible, A has not answered yet)."""
    import psycopg

    from kem.stores import open_store, split_schema

    def body(k: int, ns: str) -> list[dict[str, Any]]:
        return [record(first_record + k * size + j, ns) for j in range(size)]

    t0 = time.perf_counter()
    r = httpx.post(b.url + "/v1/edits/import", json=body(0, "import-probe"), timeout=600)
    assert r.status_code == 201, r.text
    duration = time.perf_counter() - t0
    rows = [{"kill_at": f"not killed (import on B: {duration:.1f} s)", "stored": r.json()["created"],
             "all_or_none": True, "b_serves": None, "a_restart_s": None, "a_caught_up": None, "load": loadavg()}]
    store = open_store(url=url, home="/nonexistent")
    watch = psycopg.connect(split_schema(url)[0], autocommit=True)
    in_tx = ("SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND datname = current_database() "
             "AND pid <> pg_backend_pid()")
    try:
        for k, moment in enumerate(("halfway (embedding)", "in the write transaction", "just after the commit"),
                                   start=1):
            ns = f"import-{k}"
            payload = body(k, ns)
            result: dict[str, Any] = {}

            def post(payload: list[dict[str, Any]] = payload, result: dict[str, Any] = result) -> None:
                t0 = time.perf_counter()
                try:
                    result["status"] = httpx.post(a.url + "/v1/edits/import", json=payload, timeout=600).status_code
                except httpx.HTTPError as exc:
                    result["status"] = type(exc).__name__
                result["after_s"] = round(time.perf_counter() - t0, 2)

            t = threading.Thread(target=post)
            t.start()
            deadline = time.monotonic() + 10 * duration + 30
            if k == 1:
                time.sleep(duration / 2)
            elif k == 2:  # poll the database (about every millisecond) for A's open write transaction
                while not watch.execute(in_tx).fetchone()[0] and time.monotonic() < deadline and t.is_alive():
                    time.sleep(0.0005)
            else:
                while store.count(ns, None) < size and time.monotonic() < deadline and t.is_alive():
                    time.sleep(0.001)
            a.kill()
            t.join(30)
            stored = store.count(ns, None)
            rev = store.revision()
            b_ok = until(lambda rev=rev: b.health()["index_revision"] >= rev, 10) is not None
            if stored and b_ok:  # B serves the committed import
                got = httpx.post(b.url + "/v1/completions", headers={"x-kem-namespace": ns}, timeout=60, json={
                    "model": "default", "prompt": question(payload[-1]), "max_tokens": 1}).json()["kem"]["edits"]
                b_ok = bool(got)
            restart = a.start().wait()
            caught = until(lambda rev=rev: a.health()["index_revision"] >= rev, 10) is not None
            rows.append({"kill_at": f"{moment} ({result.get('status')} after {result.get('after_s')} s)",
                         "stored": stored, "all_or_none": stored in (0, size), "b_serves": b_ok,
                         "a_restart_s": restart, "a_caught_up": caught, "load": loadavg()})
    finally:
        watch.close()
        store.close()
    return rows


# ---- 4. PostgreSQL restart under load -----------------------------------------------------------------
def pg_restart(pg: Any, reps: list[Replica], outage: float, first_record: int) -> dict[str, Any]:
    events: list[tuple[float, float, int | str, str]] = []  # (start, seconds, status, error code)
    lock = threading.Lock()
    stop = threading.Event()

    def worker(i: int) -> None:
        rep = reps[i % len(reps)]
        ns = f"pgr{i}"
        k = 0
        with httpx.Client(base_url=rep.url, timeout=30) as c:
            while not stop.is_set():
                k += 1
                rec = record(first_record + i * 1000 + k, ns)
                t0 = time.monotonic()
                try:
                    if k % 3 == 0:
                        r = c.post("/v1/edits", json=rec)
                    else:
                        r = c.post("/v1/completions", headers={"x-kem-namespace": ns},
                                   json={"model": "default", "prompt": question(rec), "max_tokens": 1})
                    code = r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
                    status: int | str = r.status_code
                except httpx.HTTPError as exc:
                    status, code = type(exc).__name__, ""
                with lock:
                    events.append((t0, time.monotonic() - t0, status, code))
                if status != 200 and status != 201:
                    time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    t_down = time.monotonic()
    pg.stop("fast")
    time.sleep(outage)
    pg.start()
    t_up = time.monotonic()
    back = [until(lambda r=r: r.health()["index_sync"] == "listen", 30) for r in reps]
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(60)
    during = [e for e in events if t_down <= e[0] < t_up]
    after = [e for e in events if e[0] >= t_up and e[2] in (200, 201)]
    hangs = [e for e in events if not isinstance(e[2], int)]
    failed = [e for e in events if e[2] not in (200, 201)]
    return {
        "requests": len(events), "during_outage": len(during),
        "503_store_unavailable": sum(1 for e in failed if e[2] == 503 and e[3] == "store_unavailable"),
        "other_failures": sum(1 for e in failed if not (e[2] == 503 and e[3] == "store_unavailable")),
        "other_samples": sorted({f"{e[2]} {e[3]}" for e in failed if not (e[2] == 503 and e[3] == 'store_unavailable')})[:4],
        "max_failed_s": max((e[1] for e in failed), default=0.0),
        "max_s": max(e[1] for e in events), "hung_or_timed_out": len(hangs),
        "first_success_after_start_s": min((e[0] + e[1] for e in after), default=float("nan")) - t_up,
        "listening_again_s": [None if x is None else round(x, 2) for x in back],
        "outage_s": round(t_up - t_down, 2), "load": loadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="staleness: sequential writes on A")
    ap.add_argument("--duration", type=float, default=60.0, help="load phase seconds")
    ap.add_argument("--clients", type=int, default=8, help="load phase client threads (half per tenant)")
    ap.add_argument("--import-size", type=int, default=1000, help="edits per bulk import in the kill phase")
    ap.add_argument("--outage", type=float, default=3.0, help="seconds PostgreSQL stays down")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: staleness,load,kill,restart")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    RECORDS.extend(json.loads(DATA.read_text()))

    from tests.postgres_server import PostgresServer

    results: dict[str, Any] = {"load_start": loadavg()}
    with tempfile.TemporaryDirectory(prefix="kem-scale-") as tmp, PostgresServer(fsync=True) as pg:
        url = pg.fresh_url("bench")
        a, b = Replica("a", Path(tmp), url), Replica("b", Path(tmp), url)
        try:
            a.start()
            b.start()
            results["start_s"] = [round(a.wait(), 1), round(b.wait(), 1)]
            until(lambda: a.health()["index_sync"] == b.health()["index_sync"] == "listen", 10)
            if "staleness" not in skip:
                results["staleness"] = staleness(a, b, args.n)
                print("staleness", json.dumps(results["staleness"]), flush=True)  # noqa: T201
            if "load" not in skip:
                res = load([a, b], args.clients, args.duration, 1000)
                acked = res.pop("acked")
                res.update(lost_edits(url, [a, b], acked))
                results["load"] = res
                print("load", json.dumps(res), flush=True)  # noqa: T201
            if "kill" not in skip:
                results["kill"] = kill_during_import(url, a, b, args.import_size, 5000)
                print("kill", json.dumps(results["kill"]), flush=True)  # noqa: T201
            if "restart" not in skip:
                results["restart"] = pg_restart(pg, [a, b], args.outage, 200)
                print("restart", json.dumps(results["restart"]), flush=True)  # noqa: T201
        finally:
            a.stop()
            b.stop()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def report(res: dict[str, Any]) -> None:
    lines = [f"replicas started in {res.get('start_s')} s; load average at start {res['load_start']}", ""]
    if "staleness" in res:
        s = res["staleness"]
        lines += ["| staleness (write on A, applied on B) | n | p50 ms | p99 ms | max ms | write p50 ms | load |",
                  "|---|---|---|---|---|---|---|",
                  f"| LISTEN/NOTIFY | {s['n']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} | "
                  f"{s['write_p50_ms']:.1f} | {s['load']} |", ""]
    if "load" in res:
        s = res["load"]
        lines += ["| load | s | requests | req/s | writes | reads (chat) | errors | cross-tenant leaks | reads missing "
                  "the edit | lost edits | indexes caught up | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| 2 replicas x {s.get('clients', '')} clients | {s['seconds']} | {s['requests']} | {s['req_per_s']:.1f} | "
                  f"{s['writes']} | {s['reads']} ({s.get('chats', 0)}) | {s['errors']} | {s['leaks']} | {s['misses']} | {s['lost']} | "
                  f"{s['indexes_at_store_revision']} | {s['load']} |", ""]
    if "kill" in res:
        lines += ["| kill -9 A during import | stored | all or none | B serves it | A restart s | A caught up | load |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['kill_at']} | {r['stored']} | {r['all_or_none']} | {r['b_serves']} | "
                  f"{'' if r['a_restart_s'] is None else round(r['a_restart_s'], 1)} | {r['a_caught_up']} | {r['load']} |"
                  for r in res["kill"]]
        lines.append("")
    if "restart" in res:
        s = res["restart"]
        lines += ["| PostgreSQL restart | outage s | requests | during outage | 503 store_unavailable | other failures | "
                  "slowest failure s | hung | first success after start s | listening again s | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| under load (4 clients) | {s['outage_s']} | {s['requests']} | {s['during_outage']} | "
                  f"{s['503_store_unavailable']} | {s['other_failures']} {s['other_samples'] or ''} | "
                  f"{s['max_failed_s']:.2f} | {s['hung_or_timed_out']} | {s['first_success_after_start_s']:.2f} | "
                  f"{s['listening_again_s']} | {s['load']} |"]
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
