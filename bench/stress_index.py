"""Stress ``kem.index.NamespacedIndex`` with concurrent search, add, delete, rebuild and save threads.

Every round runs in a child process, so a crash inside FAISS (a segfault) is counted instead of
ending the run. Each child checks, while it runs, that every search result is well formed (distinct
ids of the searched namespace only, best first, at most k) and that every saved index loads back;
when its threads have stopped it compares the index with what the writers wrote (same ids per
namespace, and exact top-k against brute force with every inverted list visited).

Threads: searchers; an adder and a deleter (each owning its ids, both adding and deleting); a
rebuilder that grows a namespace past ``ann_threshold`` (flat -> HNSW or IVF, built in the background
while the others go on) and shrinks it below half (-> flat; on the way HNSW tombstones pass
``DEAD_FRACTION`` and start background compactions); a saver that saves and reloads.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stress_index.py --seconds 60 [--kind ivf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from kem.index import ANN_KINDS, FLAT, HNSW, IVF, NamespacedIndex

D = 32
THRESHOLD = 1500  # vectors: "b" stays above it (HNSW/IVF), "a" hovers around it, "burst" crosses it both ways
KINDS = ("search", "add", "delete", "rebuild", "save")


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Run:
    """One child's workload: shared index, per-writer ground truth, counters and errors."""

    def __init__(self, seconds: float, seed: int, searchers: int, kind: str = HNSW) -> None:
        self.seconds, self.seed, self.searchers, self.kind = seconds, seed, searchers, kind
        self.params = {"ann_kind": kind, "nprobe": 8, "ef_search": 32}
        self.idx = NamespacedIndex(D, ann_threshold=THRESHOLD, **self.params)  # type: ignore[arg-type]
        self.truth: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # writer -> {ns/id: vectors}
        self.ops: Counter[str] = Counter()
        self._ops_lock = threading.Lock()
        self.errors: list[str] = []
        self.stop = threading.Event()
        rng = np.random.default_rng(seed)
        for ns, n, keys in (("a", 300, 2), ("b", 2000, 1)):  # a starts flat, b approximate
            own = self.truth.setdefault(f"pre-{ns}", {})
            ids = [f"{ns}/pre{i}" for i in range(n)]
            vecs = [unit(rng, keys) for _ in ids]
            self.idx.add_many(ns, [i.split("/", 1)[1] for i in ids], vecs)
            own.update(zip(ids, vecs, strict=True))
        self.idx.wait()

    def count(self, kind: str, n: int = 1) -> None:
        with self._ops_lock:
            self.ops[kind] += n

    def _guard(self, name: str, body) -> None:  # noqa: ANN001
        """Run ``body`` until stopped, restarting it after an exception (recorded; 50 of them stop the run)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        while not self.stop.is_set():
            try:
                body(rng)
            except Exception:
                self.errors.append(f"{name}: {traceback.format_exc(limit=3)}")
                if len(self.errors) >= 50:
                    self.stop.set()

    # ---- threads ----------------------------------------------------------------------------------
    def searcher(self, rng: np.random.Generator) -> None:
        while not self.stop.is_set():
            ns = ("a", "b", "burst", "none")[rng.integers(4)]
            q, k = unit(rng, int(rng.integers(1, 9))), int(rng.integers(1, 21))
            for row in self.idx.search(ns, q, k):
                ids = [i for i, _ in row]
                scores = [s for _, s in row]
                if len(ids) > k or len(set(ids)) != len(ids) or scores != sorted(scores, reverse=True):
                    self.errors.append(f"search {ns} k={k}: malformed {row[:5]}")
                if ns in ("a", "b") and len(ids) < k:  # these never hold fewer than 20 edits
                    self.errors.append(f"search {ns} k={k}: only {len(ids)} results")
                if any(not (i.startswith("pre") or i.startswith(ns + "-")) for i in ids):
                    self.errors.append(f"search {ns}: foreign ids {ids}")
            self.count("search")

    def writer(self, name: str, rng: np.random.Generator, lo: int, hi: int) -> None:
        """Add (or replace) and delete own ids in "a" and "b", keeping between lo and hi of them."""
        own = self.truth.setdefault(name, {})
        n = 0
        while not self.stop.is_set():
            ns = ("a", "b")[rng.integers(2)]
            live = [i for i in own if i.startswith(ns + "/")]
            if live and (len(live) >= hi or (len(live) > lo and rng.random() < 0.5)):
                key = live[rng.integers(len(live))]
                assert self.idx.remove(ns, key.split("/", 1)[1])
                del own[key]
                self.count("delete")
            else:
                batch = int(rng.integers(1, 6))
                keys = [f"{ns}/{ns}-{name}{n + j}" if rng.random() < 0.8 or not live
                        else live[rng.integers(len(live))] for j in range(batch)]
                n += batch
                vecs = [unit(rng, int(rng.integers(1, 4))) for _ in keys]
                self.idx.add_many(ns, [k.split("/", 1)[1] for k in keys], vecs)
                own.update(zip(keys, vecs, strict=True))
                self.count("add")

    def rebuilder(self, rng: np.random.Generator) -> None:
        """Grow "burst" past the threshold (flat -> ANN), then shrink it under half (ANN -> flat)."""
        own = self.truth.setdefault("burst", {})
        n = 0
        while not self.stop.is_set():
            keys = [f"burst/burst-{n + j}" for j in range(THRESHOLD // 2 + 20)]
            n += len(keys)
            vecs = [unit(rng, 2) for _ in keys]
            self.idx.add_many("burst", [k.split("/", 1)[1] for k in keys], vecs)
            own.update(zip(keys, vecs, strict=True))
            self.idx.wait("burst")  # searches and the other writers go on meanwhile
            if self.idx.kind("burst") != self.kind:
                self.errors.append(f"burst did not switch to {self.kind}")
            self.count("rebuild")
            while self.idx.kind("burst") != FLAT and not self.stop.is_set():
                if 2 * len(own) < THRESHOLD // 2 - 40:  # past the switch: it waits for a compaction
                    self.idx.wait("burst")
                    if self.idx.kind("burst") != FLAT:
                        self.errors.append(f"burst stayed {self.idx.kind('burst')} at {2 * len(own)} vectors")
                    break
                key = next(iter(own))
                self.idx.remove("burst", key.split("/", 1)[1])
                del own[key]
            self.count("rebuild", int(self.idx.kind("burst") == FLAT))

    def saver(self, rng: np.random.Generator) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            while not self.stop.is_set():
                self.idx.save(Path(tmp) / "ix", {"embedder": "stress"})
                back, _ = NamespacedIndex.load(Path(tmp) / "ix", THRESHOLD, maintain=False,  # raises if torn
                                               **self.params)
                if not back.namespaces():
                    self.errors.append("saved index has no namespaces")
                self.count("save")
                self.stop.wait(0.05)

    # ---- the check at the end ---------------------------------------------------------------------
    def check(self) -> list[str]:
        problems = []
        want: dict[str, dict[str, np.ndarray]] = {}
        for own in self.truth.values():
            for key, v in own.items():
                ns, edit_id = key.split("/", 1)
                want.setdefault(ns, {})[edit_id] = v
        rng = np.random.default_rng(self.seed + 1)
        for ns, edits in want.items():
            part = self.idx._parts[ns]
            if set(part.slot_of) != set(edits):
                problems.append(f"{ns}: index holds {len(part.slot_of)} ids, writers left {len(edits)}")
                continue
            if part.ntotal != sum(len(v) for v in edits.values()):
                problems.append(f"{ns}: {part.ntotal} vectors, writers left {sum(len(v) for v in edits.values())}")
            if part.index.ntotal != part.ntotal + part.dead:
                problems.append(f"{ns}: {part.index.ntotal} vectors in FAISS, {part.ntotal} live + {part.dead} dead")
            if part.kind == IVF:
                part.index.nprobe = part.index.nlist  # every list visited: exact
            elif part.kind == HNSW:
                part.ef_search = part.index.ntotal  # the whole (connected) graph visited: exact
                part.apply_params()
            ids = list(edits)
            mat = np.concatenate([edits[i] for i in ids])
            owner = np.repeat(np.arange(len(ids)), [len(edits[i]) for i in ids])
            q = unit(rng, 20)
            sims = q @ mat.T
            for qi, row in enumerate(self.idx.search(ns, q, 10)):
                best = np.full(len(ids), -np.inf)
                np.maximum.at(best, owner, sims[qi])
                truth = np.sort(best)[::-1][: len(row)]
                if not np.allclose([s for _, s in row], truth, atol=1e-5):
                    problems.append(f"{ns}: query {qi} scores differ from brute force")
                for edit_id, s in row:
                    if abs(float(best[ids.index(edit_id)]) - s) > 1e-5:
                        problems.append(f"{ns}: {edit_id} scored {s}, brute force {best[ids.index(edit_id)]}")
        return problems

    def go(self) -> dict:
        threads = [threading.Thread(target=self._guard, args=(f"search{i}", self.searcher))
                   for i in range(self.searchers)]
        threads += [threading.Thread(target=self._guard, args=(name, lambda r, n=name: self.writer(n, r, 50, 400)))
                    for name in ("adder", "deleter")]
        threads += [threading.Thread(target=self._guard, args=(n, f)) for n, f in
                    (("rebuild", self.rebuilder), ("save", self.saver))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        problems = self.check()
        return {"wall_s": wall, "ops": dict(self.ops), "errors": self.errors[:10], "n_errors": len(self.errors),
                "problems": problems[:10], "consistent": not problems}


def child(seconds: float, seed: int, searchers: int, kind: str) -> int:
    out = Run(seconds, seed, searchers, kind).go()
    print(json.dumps(out), flush=True)
    return 0 if out["consistent"] and not out["n_errors"] else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="total time, split into rounds")
    ap.add_argument("--round-seconds", type=float, default=10.0, help="time per child process")
    ap.add_argument("--searchers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=ANN_KINDS, default=HNSW, help="the approximate index kind")
    ap.add_argument("--child", action="store_true", help="run one round here and print its JSON")
    args = ap.parse_args()
    if args.child:
        sys.exit(child(args.seconds, args.seed, args.searchers, args.kind))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    ops: Counter[str] = Counter()
    wall = 0.0
    rounds = crashes = failed = 0
    left = args.seconds
    while left > 0.5:
        secs = min(args.round_seconds, left)
        proc = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(secs), "--seed",
                               str(args.seed + rounds), "--searchers", str(args.searchers), "--kind", args.kind],
                              capture_output=True, text=True, env=env, check=False)
        rounds += 1
        left -= secs
        if proc.returncode < 0 or not proc.stdout.strip():
            crashes += 1
            print(f"round {rounds}: crashed (rc {proc.returncode}) {proc.stderr[-300:]}", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        ops.update(res["ops"])
        wall += res["wall_s"]
        if proc.returncode:
            failed += 1
            print(f"round {rounds}: {res['errors'][:3]} {res['problems'][:3]}", file=sys.stderr)
    print(f"stress_index: {args.kind}, {rounds} rounds of {args.round_seconds:g} s, {args.searchers} searchers, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs\n")
    print("| kind | ops | ops/s |\n|---|---:|---:|")
    for kind in KINDS:
        print(f"| {kind} | {ops[kind]} | {ops[kind] / wall if wall else 0:.1f} |")
    print(f"\ncrashes={crashes} failed_checks={failed} rounds={rounds} measured_s={wall:.1f}")
    sys.exit(1 if crashes or failed else 0)


if __name__ == "__main__":
    main()
