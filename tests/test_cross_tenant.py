"""Cross-tenant isolation over every route of ``kem serve`` and its console (tests/cross_tenant.py), on the
real app, model, SQLite store and index, with tenant bob's edits, his adapter version (its manifest
lists his edits), his console job and an evaluation run: tenant alice, on any route, with any query or
body, sees nothing of bob's, and his ids answer exactly as missing ones. A small budget here;
bench/fuzz_cross_tenant.py runs thousands of cases."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kem.server.auth import digest
from kem.server.jobs import Job
from kem.versions import VersionStore
from tests.cross_tenant import BOB_MARK, routes, run
from tests.test_console import keyed_app

KEYS = {"admin": "sk-ct-admin", "alice": "sk-ct-alice", "bob": "sk-ct-bob"}


def make_world(tmp: Path, generator, embedder, kem_settings):
    app, settings, editor = keyed_app(tmp, KEYS, generator, embedder, kem_settings)
    client = TestClient(app, follow_redirects=False)
    bob_h = {"authorization": f"Bearer {KEYS['bob']}"}
    bob_edits = [client.post("/v1/edits", headers=bob_h, json={
        "subject": f"{BOB_MARK} Corp {i}", "prompt": "The CEO of {} is", "target_new": f"{BOB_MARK} Person {i}",
        "paraphrases": [f"Who runs {BOB_MARK} Corp {i}?"], "evidence": f"{BOB_MARK} memo"}).json() for i in range(3)]
    alice_h = {"authorization": f"Bearer {KEYS['alice']}"}
    for i in range(2):
        client.post("/v1/edits", headers=alice_h, json={"subject": f"Alice Corp {i}", "prompt": "The CEO of {} is",
                                                        "target_new": f"Alice Person {i}"}).raise_for_status()
    # bob's adapter version (its manifest names his edits) and a console job of his
    version = VersionStore(settings.home, namespace="bob").publish(
        {"base": settings.model, "method": "memit", "kind": "adapter", "edit_ids": [e["id"] for e in bob_edits],
         "metrics": {"note": BOB_MARK}}, lambda folder: (folder / "adapter").mkdir()).version
    editor.store.mark_consolidated([e["id"] for e in bob_edits], f"bob/{version}")  # as the job marks them
    bob_edits = client.get("/v1/edits", headers=bob_h).json()["data"]
    log = Path(settings.home) / "console-jobs" / "bobjob000001.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"dry run of {BOB_MARK} Corp\n")
    app.state.console_jobs._jobs["bobjob000001"] = Job("bobjob000001", "memit", "bob", "bob", time.time(), log,
                                                       returncode=0)
    # an admin's dry run holds the one slot (a record with no process: it stays "running"), so the cases
    # that post to /console/versions/dry-run get "already running" instead of starting kem consolidate
    app.state.console_jobs._jobs["adminjob0001"] = Job("adminjob0001", "memit", None, "", time.time(), log)
    run_dir = Path(settings.home) / "eval" / "bobrun"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"config": {"dataset": BOB_MARK}, "summary": {}, "cases": {}}))
    bob = {"edit": bob_edits[0]["id"], "job": "bobjob000001", "version": version, "key": digest(KEYS["bob"])[:12],
           "run": "bobrun"}
    secrets = [BOB_MARK, *(e["id"] for e in bob_edits), "bobjob000001"]
    return app, client, editor, bob, secrets, bob_edits


@pytest.fixture(scope="module")
def world(tmp_path_factory, generator, embedder, kem_settings):
    app, client, editor, bob, secrets, bob_edits = make_world(tmp_path_factory.mktemp("cross-tenant"), generator,
                                                             embedder, kem_settings)
    yield app, client, bob, secrets, bob_edits
    editor.close()


def test_every_route_is_covered(world):
    app = world[0]
    table = routes(app)
    paths = {p for _, p in table}
    assert {"/v1/edits/{edit_id}", "/console/edits/{edit_id}", "/console/versions/{group}/{version}",
            "/console/jobs/{job_id}", "/v1/audit", "/console/playground"} <= paths
    assert len(table) >= 40


def test_another_tenants_ids_answer_as_missing_ones_and_nothing_leaks(world):
    app, client, bob, secrets, bob_edits = world
    stats: Counter[str] = Counter()
    run(client, app, KEYS["alice"], bob, secrets, examples=250, stats=stats)
    assert sum(stats.values()) == 250 and any(k.startswith("pair") for k in stats)
    # nothing of bob's changed (a write that went through would show here)
    bob_h = {"authorization": f"Bearer {KEYS['bob']}"}
    after = client.get("/v1/edits", headers=bob_h).json()["data"]
    assert [(e["id"], e["target_new"], e["status"]) for e in after] == [
        (e["id"], e["target_new"], e["status"]) for e in bob_edits]
