"""The first consolidation job on a fresh install: no covariance statistics cached yet.

For each method, a fresh cache folder (the converted models linked in, nothing else) and a fresh home
holding ``--n`` CounterFact edit-split records (``kem edit import --limit``), then
``kem consolidate --home H --method M --json`` in its own process, as a user would run it. Prints the
wall seconds and CPU seconds (the child process, every core) of the whole command (model load,
statistics, edit computation, the gates' checks of every form, publishing) and what it published.

    .venv/bin/python bench/bench_first_job.py --methods rome,memit,alphaedit,ft-l,distill
    .venv/bin/python bench/bench_first_job.py --methods memit --corpus model   # the old default

``--corpus model`` samples the statistics' texts from the model (kem's default before issue 20's
shipped text); the default reads the WikiText-2 text kem ships (``kem/data/covariance_text.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rome,memit,alphaedit,ft-l,distill")
    ap.add_argument("--n", type=int, default=10, help="edits in the store (the first N records of --data)")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    ap.add_argument("--corpus", default=None, help="passed to kem consolidate --corpus (e.g. model)")
    ap.add_argument("--args", default="", help="more kem consolidate options, e.g. \"--all-or-nothing\" or "
                    "\"--batch-size 256\"")
    ap.add_argument("--cache", default=os.environ.get("KEM_CACHE_DIR", "~/.cache/kem"),
                    help="the cache whose converted models are linked into each fresh cache")
    a = ap.parse_args()
    kem = str(Path(sys.executable).with_name("kem"))
    models = Path(a.cache).expanduser() / "models"
    if not models.is_dir():
        raise SystemExit(f"{models} holds no converted models: run kem demo (or scripts/install.sh) first")
    rows = []
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory(prefix="kem-first-job-") as tmp:
            cache, home = Path(tmp) / "cache", Path(tmp) / "home"
            cache.mkdir()
            (cache / "models").symlink_to(models)
            env = {**os.environ, "KEM_CACHE_DIR": str(cache), "KEM_HOME": str(home)}
            env.pop("KEM_STORE", None)
            subprocess.run([kem, "edit", "import", a.data, "--limit", str(a.n)], env=env, check=True,
                           capture_output=True)
            cmd = [kem, "consolidate", "--method", method, "--json"] + (["--corpus", a.corpus] if a.corpus else []) \
                + a.args.split()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            try:
                res = json.loads(p.stdout)
            except ValueError:
                res = {}
            m = res.get("metrics", {})
            print(method, {k: round(v, 1) for k, v in res.get("timings", {}).items()}, file=sys.stderr)
            rows.append((method, wall, cpu, (res.get("version") if res.get("published") else "refused") if res else "-",
                         m.get("retired"), m.get("deferred"), m.get("reliability"), m.get("generalization"),
                         m.get("locality"), m.get("perplexity_increase")))
            if p.returncode not in (0, 1) or not res:
                print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
    print(f"\nfirst job on a fresh cache, {a.n} edits, corpus {a.corpus or 'shipped text'}, "
          f"options {a.args or '(defaults)'}, {os.cpu_count()} cores\n")
    print("| method | wall s | CPU s | version | retired | deferred | reliability | generalization | locality | perplexity |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    def f(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    for method, wall, cpu, ver, ret, dfr, rel, gen, loc, ppl in rows:
        print(f"| {method} | {wall:.0f} | {cpu:.0f} | {ver} | {'-' if ret is None else ret} | {dfr or 0} | {f(rel)} | {f(gen)} | "
              f"{f(loc)} | {'-' if ppl is None else f'{100 * ppl:+.1f}%'} |")


if __name__ == "__main__":
    main()
