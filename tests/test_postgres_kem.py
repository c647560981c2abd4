"""kem on a PostgreSQL store (issue 13, first half), on a real PostgreSQL: ``--store`` / ``KEM_STORE`` on the
CLI and the editor (an edit added by one process is applied by another with its own home and local
index), API keys in the database shared by replicas (``kem keys``), and one consolidation at a time on
both backends (two jobs at once: exactly one publishes; a second ``kem consolidate`` exits 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kem.edit import Edit, EditStatus
from kem.errors import AuthError, ConflictError, ValidationError
from kem.settings import Settings
from kem.stores import open_store
from tests.conftest import shared_data

PROMPT = "The mother tongue of Danielle Darrieux is"


def kem(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "KEM_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **(env or {})}
    return subprocess.run([sys.executable, "-m", "kem", *args], capture_output=True, text=True, env=full, timeout=600)


def test_cli_adds_into_postgres_and_another_home_applies_it(pg_url, tmp_path, generator, embedder):
    """`kem edit add --store URL` in one process; `kem edit list` with KEM_STORE and an editor on the same
    URL but another home (another replica) see and apply it; the FAISS index is local to each home."""
    one, two = tmp_path / "replica-1", tmp_path / "replica-2"
    r = kem("edit", "add", "--subject", "Danielle Darrieux", "--prompt", "The mother tongue of {} is",
            "--target", "English", "--store", pg_url, "--json", home=one)
    assert r.returncode == 0, r.stderr[-2000:]
    added = json.loads(r.stdout)
    r = kem("edit", "list", "--json", home=two, env={"KEM_STORE": pg_url})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [e["id"] for e in json.loads(r.stdout)] == [added["id"]]
    assert not (one / "edits.sqlite").exists() and not (two / "edits.sqlite").exists()

    from kem.editor import KnowledgeEditor

    settings = Settings(device="cpu", store=pg_url)
    with KnowledgeEditor.open(two, settings=settings, generator=generator, embedder=embedder) as ke:
        ans = ke.generate(PROMPT, "default", max_new_tokens=6)
        assert [s.edit.id for s in ans.edits] == [added["id"]] and "English" in ans.text
        assert "English" not in ke.generate(PROMPT, "default", max_new_tokens=6, use_edits=False).text
    assert len(list(two.glob("index-pg-*"))) == 1  # derived, local, named after the database and schema


def test_supersede_windows_and_audit_replicate(pg_url, tmp_path, embedder):
    """Two replicas (own homes and indexes) on one PostgreSQL store: a fact changed through one is
    superseded for the other, which answers "as of" the past with the old value and reads the audit log."""
    from datetime import UTC, datetime

    from kem.editor import KnowledgeEditor
    from kem.provenance import acting_as

    settings = Settings(device="cpu", store=pg_url, sync_interval=0)
    with KnowledgeEditor.open(tmp_path / "r1", settings=settings, embedder=embedder) as a, \
            KnowledgeEditor.open(tmp_path / "r2", settings=settings, embedder=embedder) as b:
        with acting_as("key:test@default"):
            old = a.add({"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English",
                         "valid_from": "2020-01-01"})
            new = b.add({"subject": "Danielle Darrieux", "prompt": "{} is a native speaker of", "target_new": "German"})
        assert new.supersedes == [old.id]
        now = [s.edit.target_new for s in a.retrieve(PROMPT)]
        then = [s.edit.target_new for s in a.retrieve(PROMPT, as_of=datetime(2022, 1, 1, tzinfo=UTC))]
        assert now[:1] == ["German"] and "English" not in now and then[:1] == ["English"] and "German" not in then
        rows = a.audit("default")
        assert [(r.op, r.actor) for r in rows[-3:]] == [("add", "key:test@default"), ("supersede", "key:test@default"),
                                                       ("add", "key:test@default")]

def test_keys_in_postgres_are_shared_by_replicas(pg_url, tmp_path):
    from kem.server.auth import KeyRing
    from kem.server.keys_cli import keys_app

    run = CliRunner().invoke
    r = run(keys_app, ["add", "alice", "--rpm", "30", "--store", pg_url, "--home", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    settings = Settings(store=pg_url, home=tmp_path)
    a, b = KeyRing.from_settings("store", settings), KeyRing.from_settings("store", settings)  # two replicas
    who = b.authenticate(f"Bearer {row['key']}")
    assert (who.namespace, who.admin, who.limits.rpm) == ("alice", False, 30)
    key2 = a.create("bob", review=True)  # added on replica a (POST /admin/keys): replica b knows it at once
    assert b.authenticate(f"Bearer {key2}").namespace == "bob" and b.authenticate(f"Bearer {key2}").review
    listed = json.loads(run(keys_app, ["list", "--store", pg_url, "--json"]).output)
    assert sorted((k["namespace"], k["id"] == row["id"]) for k in listed) == [("alice", True), ("bob", False)]

    import psycopg

    from kem.stores import split_schema

    conninfo, schema = split_schema(pg_url)
    with psycopg.connect(conninfo) as conn:
        stored = conn.execute(f"SELECT digest, namespace FROM {schema}.api_keys").fetchall()
    assert len(stored) == 2 and all(row["key"] not in str(r) and key2 not in str(r) for r in stored)

    r = run(keys_app, ["revoke", row["id"], "--store", pg_url])
    assert r.exit_code == 0 and "revoked 1 key" in r.output
    b.backend.refresh = 0  # type: ignore[union-attr]  # (2 s by default)
    with pytest.raises(AuthError):
        b.authenticate(f"Bearer {row['key']}")
    assert run(keys_app, ["revoke", row["id"], "--store", pg_url]).exit_code != 0  # gone: NotFoundError


def test_keys_cli_on_a_keys_file(tmp_path):
    from kem.server.auth import KeyRing
    from kem.server.keys_cli import keys_app

    run = CliRunner().invoke
    path = tmp_path / "keys.txt"
    r = run(keys_app, ["add", "*", "--keys", str(path), "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert row["admin"] and oct(path.stat().st_mode & 0o777) == "0o600" and row["key"] not in path.read_text()
    assert KeyRing(path).authenticate(f"Bearer {row['key']}").admin
    assert [k["id"] for k in json.loads(run(keys_app, ["list", "--keys", str(path), "--json"]).output)] == [row["id"]]
    assert run(keys_app, ["revoke", row["id"], "--keys", str(path)]).exit_code == 0
    assert KeyRing(path).list() == []
    r = run(keys_app, ["list", "--home", str(tmp_path)], env={"KEM_API_KEYS_FILE": None, "KEM_STORE": None})
    assert isinstance(r.exception, ValidationError) and "--keys FILE" in str(r.exception)
    with pytest.raises(ValidationError, match="need a PostgreSQL"):
        KeyRing.from_settings("store", Settings(home=tmp_path))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_job_lock_says_who_holds_it(backend, pg_url, tmp_path):
    from kem.stores.services import job_lock

    settings = Settings(home=tmp_path, store=pg_url if backend == "postgresql" else None)
    with job_lock(settings) as held:
        with pytest.raises(ConflictError, match=re.escape(f"pid {os.getpid()}, since {held.since}")) as err:
            with job_lock(settings):
                pass
        assert held.host in str(err.value)
        held.check()  # still ours
    with job_lock(settings):  # released: the next job takes it
        pass


def test_a_job_losing_the_race_still_names_the_holder(tmp_path):
    """The holder writes its details just after it takes the lock: a job that loses the race by a moment
    waits for them instead of saying 'holder unknown' (CI saw that once)."""
    import threading

    from filelock import FileLock

    from kem.joblock import file_lock

    lock = FileLock(str(tmp_path / ".consolidate.lock"))
    lock.acquire()
    writer = threading.Timer(0.3, lambda: (tmp_path / ".consolidate.holder").write_text(
        json.dumps({"host": "other-host", "pid": 4242, "since": "2026-01-01T00:00:00+00:00"})))
    writer.start()
    try:
        with pytest.raises(ConflictError, match="host other-host, pid 4242, since 2026"):
            with file_lock(tmp_path):
                pass
    finally:
        writer.join()
        lock.release()


def test_a_lost_postgres_lock_stops_the_job_before_publishing(pg_url, tmp_path):
    """The lock's connection is killed (as a network cut or a database restart would): check() says so,
    so the job publishes nothing, and another job can take the lock."""
    import psycopg

    from kem.errors import ConsolidationError
    from kem.stores import split_schema
    from kem.stores.services import job_lock

    settings = Settings(home=tmp_path, store=pg_url)
    with job_lock(settings) as held:
        with psycopg.connect(split_schema(pg_url)[0], autocommit=True) as conn:
            killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                                  "AND granted AND pid <> pg_backend_pid()").fetchall()
        assert killed == [(True,)]
        with pytest.raises(ConsolidationError, match="lock .* was lost"):
            held.check()
        with job_lock(settings) as other:  # the database released it with the connection
            other.check()


def _counterfact(n: int) -> list[Edit]:
    recs = json.loads(Path(shared_data("counterfact", "counterfact-edit.json")).read_text())
    return [Edit(subject=r["subject"], prompt=r["prompt"], target_new=r["target_new"], namespace="default")
            for r in recs[:n]]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_consolidations_at_once_exactly_one_publishes(backend, pg_url, tmp_path):
    """Two jobs started at the same moment (FT-L, gates off, 4 probes, two CounterFact edits). On PostgreSQL
    they run from two homes (two machines): only the database's advisory lock keeps them apart."""
    import threading

    from kem.consolidation.job import Gates, consolidate
    from kem.consolidation.judge import default_probes

    url = pg_url if backend == "postgresql" else None
    homes = [tmp_path / "a", tmp_path / ("b" if url else "a")]
    store = open_store(Settings(home=homes[0], store=url))
    edits = store.add_many(_counterfact(2))
    store.close()
    start = threading.Barrier(2)
    results: list[object] = [None, None]

    def job(i: int) -> None:
        settings = Settings(home=homes[i], store=url, device="cpu")
        start.wait()
        try:
            results[i] = consolidate(settings, method="ft-l", gates=Gates(0.0, 0.0), probes=default_probes()[:4])
        except ConflictError as exc:
            results[i] = exc

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if not isinstance(r, ConflictError)]
    lost = [r for r in results if isinstance(r, ConflictError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert won[0].published and won[0].version == "v1"  # type: ignore[attr-defined]
    assert sorted(won[0].absorbed_ids) == sorted(e.id for e in edits)  # type: ignore[attr-defined]
    assert f"pid {os.getpid()}" in str(lost[0]) and "since" in str(lost[0])
    store = open_store(Settings(home=homes[0], store=url))
    try:
        for e in edits:
            assert store.get(e.id).status == EditStatus.consolidated
            assert [c.op for c in store.history(e.id)] == ["add", "consolidate"]  # consolidated once
    finally:
        store.close()
    published = [h for h in set(homes) if (h / "models" / "v1").is_dir()]
    assert len(published) == 1 and not any((h / "models" / "v2").exists() for h in homes)


def test_kem_consolidate_while_another_holds_the_lock_exits_2(pg_url, tmp_path):
    """The CLI: a second `kem consolidate` names the holder, exits 2 and touches nothing."""
    from kem.stores.services import job_lock

    settings = Settings(home=tmp_path, store=pg_url)
    store = open_store(settings)
    (edit,) = store.add_many(_counterfact(1))
    with job_lock(settings) as held:
        r = kem("consolidate", "--method", "ft-l", "--store", pg_url, home=tmp_path / "other-machine")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "another consolidate job is running on the PostgreSQL store" in r.stderr
    assert f"host {held.host}, pid {os.getpid()}, since {held.since}" in r.stderr
    assert store.get(edit.id).status == EditStatus.active and store.revision() == 1
    store.close()
    assert not (tmp_path / "other-machine" / "models").exists()
