"""kill -9 at many moments of import, serve and consolidate (issue 12): no acknowledged edit is lost, an
import is all or nothing, and after a restart there is no orphaned temporary folder and no edit that a
published version absorbed is left active (the next job would consolidate it twice).

    .venv/bin/python bench/bench_kill.py [--import-kills 7] [--serve-kills 7] [--consolidate-kills 6]

Every phase uses real processes (``kem edit import``, ``kem serve`` on 127.0.0.1, ``kem consolidate``)
and a real SQLite file; the kill moments are spread over each command's measured duration.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "KEM_HOME": str(home), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "KEM_SHARED_NAMESPACES": "default"}


def _kem(home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "kem", *args], env=_env(home), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _killed_after(home: Path, args: list[str], delay: float) -> int:
    p = subprocess.Popen([PY, "-m", "kem", *args], env=_env(home), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    try:
        return p.wait(delay)  # finished before the kill
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return -9


def _store(home: Path):  # noqa: ANN202
    from kem.stores.sqlite import SQLiteStore

    return SQLiteStore(home / "edits.sqlite")


def _subset(tmp: Path, n: int) -> Path:
    rows = json.loads(DATA.read_text(encoding="utf-8"))[:n]
    out = tmp / f"cf-{n}.json"
    out.write_text(json.dumps(rows), encoding="utf-8")
    return out


def import_phase(tmp: Path, kills: int) -> list[dict[str, object]]:
    """Each round: 20 acknowledged single adds, then an import of 400 records killed at a moment."""
    home = tmp / "import-home"
    src = _subset(tmp, 400)
    t0 = time.perf_counter()
    full = _kem(tmp / "import-probe", "edit", "import", str(src))
    assert full.returncode == 0, full.stderr
    duration = time.perf_counter() - t0
    rows = []
    acked: set[str] = set()
    for k in range(kills):
        out = _kem(home, "edit", "import", str(_subset(tmp, 20 + k)), "--namespace", f"acked{k}", "--json")
        assert out.returncode == 0, out.stderr
        store = _store(home)
        acked |= {e.id for e in store.list(f"acked{k}")}
        store.close()
        delay = duration * (k + 1) / (kills + 1)
        rc = _killed_after(home, ["edit", "import", str(src), "--namespace", f"bulk{k}"], delay)
        store = _store(home)
        have = {e.id for e in store.list()}
        bulk = store.count(f"bulk{k}")
        store.close()
        rows.append({"phase": "import", "kill_at_s": round(delay, 1), "rc": rc, "acked_lost": len(acked - have),
                     "bulk_rows": bulk, "all_or_none": bulk in (0, 400)})
    return rows


def serve_phase(tmp: Path, kills: int) -> list[dict[str, object]]:
    """Each round: a server takes concurrent edit writes; kill -9 at a moment; restart; every write
    that got a 201 must be there."""
    import httpx

    from tests.conftest import kem_server

    home_dir = tmp / "serve"
    home_dir.mkdir()
    rows = []
    for k in range(kills):
        server = kem_server(home_dir, "s").start()
        server.wait()
        acked: list[str] = []
        stop = threading.Event()

        def writer(w: int, url: str = server.url, stop: threading.Event = stop, acked: list[str] = acked,
                   k: int = k) -> None:
            c = httpx.Client(base_url=url, timeout=10)
            i = 0
            while not stop.is_set():
                try:
                    r = c.post("/v1/edits", json={"subject": f"Entity {k}-{w}-{i}", "prompt": "The maker of {} is",
                                                  "target_new": "Kem Corp"})
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acked.append(r.json()["id"])
                i += 1

        threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(3)]
        for t in threads:
            t.start()
        delay = 0.5 + 2.5 * k / max(kills - 1, 1)
        time.sleep(delay)
        server.kill()
        stop.set()
        for t in threads:
            t.join(15)
        store = _store(home_dir / "s-home")
        have = {e.id for e in store.list()}
        store.close()
        rows.append({"phase": "serve", "kill_at_s": round(delay, 1), "rc": -9, "acked": len(acked),
                     "acked_lost": len(set(acked) - have)})
    return rows


def consolidate_phase(tmp: Path, kills: int) -> list[dict[str, object]]:
    """Each round: kill ``kem consolidate --method ft-l`` at a moment, then start a server (recover
    runs) and check: no .tmp folder, every edit a published version lists is consolidated, no edit
    lost; a final job must not consolidate an absorbed edit again."""
    from kem.edit import EditStatus
    from kem.versions import VersionStore

    home = tmp / "cons-home"
    src = _subset(tmp, 6)
    assert _kem(home, "edit", "import", str(src)).returncode == 0
    probe = tmp / "cons-probe"
    assert _kem(probe, "edit", "import", str(src)).returncode == 0
    t0 = time.perf_counter()
    run = _kem(probe, "consolidate", "--method", "ft-l", "--min-reliability", "0", "--min-locality", "0")
    duration = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    rows = []
    for k in range(kills):
        store = _store(home)
        before = {e.id for e in store.list()}
        store.close()
        delay = duration * (0.6 + 0.45 * k / max(kills - 1, 1))  # 60%..105%: compute, gates, publish, marking
        rc = _killed_after(home, ["consolidate", "--method", "ft-l", "--min-reliability", "0", "--min-locality", "0"],
                           delay)
        vs = VersionStore(home)
        leftovers_before = len(list(vs.root.glob(".tmp-v*"))) if vs.root.is_dir() else 0
        from kem.versions import recover

        store = _store(home)
        recover(vs, store)  # what kem serve and the next job do first
        leftovers = len(list(vs.root.glob(".tmp-v*"))) if vs.root.is_dir() else 0
        absorbed_active = sum(1 for m in vs.list() for i in m.edit_ids if store.get(i).status == EditStatus.active)
        have = {e.id for e in store.list()}
        store.close()
        rows.append({"phase": "consolidate", "kill_at_s": round(delay, 1), "rc": rc,
                     "tmp_before_recover": leftovers_before, "tmp_after": leftovers,
                     "absorbed_but_active": absorbed_active, "acked_lost": len(before - have),
                     "versions": len(vs.list())})
        # add new pending edits so the next round has work
        assert _kem(home, "edit", "import", str(_subset(tmp, 6 + k + 1))).returncode == 0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--import-kills", type=int, default=7)
    ap.add_argument("--serve-kills", type=int, default=7)
    ap.add_argument("--consolidate-kills", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = import_phase(tmp, args.import_kills) + serve_phase(tmp, args.serve_kills) \
            + consolidate_phase(tmp, args.consolidate_kills)
    keys = ["phase", "kill_at_s", "rc", "acked", "acked_lost", "bulk_rows", "all_or_none", "tmp_before_recover",
            "tmp_after", "absorbed_but_active", "versions"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    bad = [r for r in rows if r.get("acked_lost") or r.get("all_or_none") is False or r.get("tmp_after")
           or r.get("absorbed_but_active")]
    print(f"\n{len(rows)} kills; acknowledged edits lost: {sum(int(r.get('acked_lost') or 0) for r in rows)}; "
          f"failures: {len(bad)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    from kem.runtime import own_process

    own_process()
    main()
