"""The cross-tenant property (tests/cross_tenant.py) at volume: ``--examples`` generated cases (default
5,000) over every route of ``kem serve`` and its console, as tenant alice against tenant bob's edits,
adapter version, console job and an evaluation run, on the real app, model, SQLite store and index
(tests/test_cross_tenant.py builds the same world and runs 250 cases on CI).

    .venv/bin/python bench/fuzz_cross_tenant.py [--examples 5000]
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=5000)
    args = ap.parse_args()

    from kem.editor import KnowledgeEditor
    from kem.settings import Settings
    from tests.cross_tenant import routes, run
    from tests.test_cross_tenant import KEYS, make_world

    settings = Settings(device="cpu")
    probe = KnowledgeEditor.in_memory(settings=settings)
    generator, embedder = probe.generator, probe.memory.embedder
    with tempfile.TemporaryDirectory(prefix="kem-xt-") as tmp:
        app, client, editor, bob, secrets, bob_edits = make_world(Path(tmp), generator, embedder, settings)
        stats: Counter[str] = Counter()
        t0 = time.perf_counter()
        run(client, app, KEYS["alice"], bob, secrets, args.examples, stats)
        wall = time.perf_counter() - t0
        after = client.get("/v1/edits", headers={"authorization": f"Bearer {KEYS['bob']}"}).json()["data"]
        unchanged = [(e["id"], e["target_new"]) for e in after] == [(e["id"], e["target_new"]) for e in bob_edits]
        editor.close()
    pairs = sum(v for k, v in stats.items() if k.startswith("pair"))
    print(f"{args.examples} cases over {len(routes(app))} routes in {wall:.0f} s: {pairs} foreign/missing id pairs "
          f"(all equal), {args.examples - pairs} id-less requests; 0 leaks of bob's data in bodies, headers or logs; "
          f"bob's edits unchanged: {unchanged}")
    print("statuses:", dict(sorted(stats.items())))


if __name__ == "__main__":
    main()
