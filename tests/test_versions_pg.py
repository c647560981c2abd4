"""Model versions recorded in a PostgreSQL store (issue 13, "consolidation across replicas"), on the session's
real PostgreSQL: publish and rollback write the ``versions`` tables and ``NOTIFY kem_versions``; two homes
sharing ``KEM_MODELS_DIR`` agree on ``current`` even when a pointer file says otherwise; ``recover()``
records a folder the database missed and reports a recorded version with no folder; ``kem models
--store``; and a real ``kem serve --model-version current`` replica hot-swaps to a version another process
publishes (and keeps serving when the new version cannot be loaded)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from kem.settings import Settings
from kem.stores import split_schema
from kem.versions import recover, versions_for
from tests.conftest import kem_server


def _settings(home: Path, url: str, models: Path) -> Settings:
    return Settings(home=home, store=url, models_dir=models, device="cpu")


def _toy(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"w")


def _tenant_adapter(folder: Path) -> None:
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")


def _rows(url: str) -> tuple[list[tuple[str, str]], dict[str, str | None]]:
    conninfo, schema = split_schema(url)
    with psycopg.connect(conninfo) as conn:
        versions = conn.execute(f"SELECT namespace, name FROM {schema}.versions ORDER BY namespace, name").fetchall()
        current = dict(conn.execute(f"SELECT namespace, name FROM {schema}.versions_current").fetchall())
    return [tuple(r) for r in versions], current


def test_publish_and_rollback_are_recorded_and_announced(pg_url, tmp_path):
    """Two homes (two machines) on one store and one shared models folder: what one publishes or rolls back,
    the other reads as current, from the database, whatever its pointer file says; each move of current is
    announced on kem_versions; tenants' adapters follow the recorded current."""
    from kem.tenants import TenantLoras

    models = tmp_path / "shared-models"
    a, b = _settings(tmp_path / "a", pg_url, models), _settings(tmp_path / "b", pg_url, models)
    conninfo, schema = split_schema(pg_url)
    listen = psycopg.connect(conninfo, autocommit=True)
    listen.execute("LISTEN kem_versions")
    with versions_for(a) as va, versions_for(b) as vb:
        assert va.current() is None and va.list() == []
        v1 = va.publish({"base": "m", "method": "toy"}, _toy)
        v2 = va.publish({"base": "m", "method": "toy", "parent": "v1"}, _toy, make_current=False)
        assert (v1.version, v2.version) == ("v1", "v2")
        assert _rows(pg_url) == ([("", "v1"), ("", "v2")], {"": "v1"})
        assert vb.current() == "v1" and [m.version for m in vb.list()] == ["v1", "v2"]
        vb.rollback("v2")  # from the other machine
        assert va.current() == "v2" and vb.manifest("v2").parent == "v1" and va.absorbed("v2") == {"v1", "v2"}
        (models / "current").write_text("v1\n")  # a stale pointer file (another machine's, an NFS cache)
        assert va.current() == "v2" and vb.resolve("current").version == "v2"  # the database wins
        vb.rollback("base")
        assert va.current() is None and _rows(pg_url)[1] == {"": None}

        # a tenant's adapter versions: recorded under its namespace; its lookup follows the database
        alice_a, alice_b = va.of("alice"), vb.of("alice")
        alice_a.publish({"base": "m", "method": "toy", "parent": None}, _tenant_adapter)
        assert vb.tenants() == ["alice"] and alice_b.current() == "v1"
        tenants = TenantLoras.for_settings(b)
        try:
            assert tenants.get("alice").version == "v1"  # type: ignore[union-attr]
            alice_a.rollback("base")
            assert tenants.get("alice") is not None  # trusted for `refresh` seconds...
            tenants.invalidate("alice")  # ...unless kem serve heard the notification
            assert tenants.get("alice") is None
        finally:
            tenants.close()
    got = [n.payload for n in listen.notifies(timeout=2, stop_after=5)]
    listen.close()
    assert got == [f"{schema}::v1", f"{schema}::v2", f"{schema}::base", f"{schema}:alice:v1", f"{schema}:alice:base"]
    assert not (tmp_path / "a" / "models").exists() and not (tmp_path / "b" / "models").exists()


def test_recover_records_what_the_database_missed(pg_url, tmp_path):
    """Versions published before the store was PostgreSQL, and a publish whose database write failed after
    its folder was complete: recover() records them (the failed one not current); a recorded version whose
    folder is missing here is reported, not removed, and naming it says to check KEM_MODELS_DIR."""
    from kem.errors import NotFoundError
    from kem.stores import open_store
    from kem.versions import VersionStore

    models = tmp_path / "models"
    files_only = VersionStore(tmp_path, models_dir=models)  # as with SQLite
    files_only.publish({"base": "m", "method": "toy"}, _toy)
    files_only.publish({"base": "m", "method": "toy", "parent": "v1"}, _toy)
    settings = _settings(tmp_path, pg_url, models)
    store = open_store(settings)
    conninfo, schema = split_schema(pg_url)
    try:
        with versions_for(settings) as vs:
            assert vs.current() == "v2"  # nothing recorded yet: the pointer file
            out = recover(vs, store)
            assert out.recorded == ("v1", "v2", "current=v2") and out.missing == ()
            assert _rows(pg_url) == ([("", "v1"), ("", "v2")], {"": "v2"})

            with psycopg.connect(conninfo, autocommit=True) as conn:  # the database refuses the next record
                conn.execute(f"ALTER TABLE {schema}.versions ADD CONSTRAINT refuse CHECK (name <> 'v3') NOT VALID")
            with pytest.raises(psycopg.errors.CheckViolation):
                vs.publish({"base": "m", "method": "toy", "parent": "v2"}, _toy)
            assert (models / "v3" / "manifest.json").is_file() and vs.current() == "v2"
            assert (models / "current").read_text().strip() == "v2"  # not moved either
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE {schema}.versions DROP CONSTRAINT refuse")
            assert [m.version for m in vs.list()] == ["v1", "v2", "v3"]  # listed from its folder meanwhile
            assert recover(vs, store).recorded == ("v3",)
            assert _rows(pg_url) == ([("", "v1"), ("", "v2"), ("", "v3")], {"": "v2"})

        elsewhere = _settings(tmp_path / "other", pg_url, tmp_path / "not-the-shared-folder")
        with versions_for(elsewhere) as vs:
            assert recover(vs, store).missing == ("v1", "v2", "v3")
            assert vs.current() == "v2" and vs.manifest("v2").parent == "v1"  # the manifest is in the database
            with pytest.raises(NotFoundError, match="KEM_MODELS_DIR"):
                vs.resolve("current")
        assert _rows(pg_url)[0] == [("", "v1"), ("", "v2"), ("", "v3")]  # nothing removed
    finally:
        store.close()


def test_kem_models_commands_take_the_store(pg_url, tmp_path):
    from kem.consolidation.consolidate_cli import models_app

    models = tmp_path / "shared"
    with versions_for(_settings(tmp_path / "a", pg_url, models)) as vs:
        vs.publish({"base": "m", "method": "toy"}, _toy)
        vs.publish({"base": "m", "method": "toy", "parent": "v1"}, _toy)
    run, env = CliRunner().invoke, {"KEM_MODELS_DIR": str(models), "KEM_STORE": None}
    home = ["--home", str(tmp_path / "b")]
    r = run(models_app, ["rollback", "v1", "--store", pg_url, *home], env=env)
    assert r.exit_code == 0 and "current model version: v1 (was v2)" in r.output, r.output
    (models / "current").write_text("v2\n")
    r = run(models_app, ["list", "--json", *home], env={**env, "KEM_STORE": pg_url})
    listed = json.loads(r.output)
    assert listed["current"] == "v1" and [(v["version"], v["current"]) for v in listed["versions"]] == [
        ("v1", True), ("v2", False)]
    r = run(models_app, ["show", "v2", "--json", "--store", pg_url, *home], env=env)
    assert json.loads(r.output)["absorbed_versions"] == ["v2", "v1"]
    assert json.loads(run(models_app, ["list", "--json", *home], env=env).output)["current"] == "v2"  # files


def _publish_base_as(settings: Settings, parent: str | None) -> str:
    """Publish the base model's files (linked) as the next version: they stand in for consolidated weights."""
    from kem.models import resolve_model

    folder = resolve_model(settings.model, settings.cache_dir)

    def write(tmp: Path) -> None:
        for f in folder.iterdir():
            (tmp / f.name).symlink_to(f)

    with versions_for(settings) as vs:
        return vs.publish({"base": settings.model, "parent": parent, "method": "memit"}, write).version


def _wait_for(url: str, pred, timeout: float = 60.0) -> tuple[dict, float]:
    t0 = time.perf_counter()
    while True:
        body = httpx.get(url + "/healthz", timeout=10).json()
        if pred(body):
            return body, time.perf_counter() - t0
        assert time.perf_counter() - t0 < timeout, body
        time.sleep(0.05)


def test_a_replica_serving_current_hot_swaps_on_publish(pg_url, tmp_path):
    """A real `kem serve --model-version current` on the store: a version published by this process (another
    machine, as far as the replica knows) is served within seconds; a version it cannot load leaves the
    old one serving; a rollback through `kem models rollback` swaps back."""
    from kem.consolidation.consolidate_cli import models_app

    models = tmp_path / "shared-models"
    settings = _settings(tmp_path / "publisher", pg_url, models)
    server = kem_server(tmp_path, "replica", "--store", pg_url, "--model-version", "current",
                        env={"KEM_MODELS_DIR": str(models), "KEM_DEVICE": "cpu"}).start()
    try:
        server.wait()
        body, _ = _wait_for(server.url, lambda b: b.get("versions", {}).get("listening"))
        assert body["model"] == "smollm2-135m-instruct" and body["absorbed_versions"] == []
        assert body["versions"]["follow"] == "current"

        assert _publish_base_as(settings, None) == "v1"
        body, took = _wait_for(server.url, lambda b: b["model"].endswith("@v1"))
        assert body["absorbed_versions"] == ["v1"] and body["versions"]["swaps"] == 1
        print(f"publish -> served: {took:.2f} s (replica: {body['versions']['last_swap_s']:.2f} s)")
        assert took < 30

        with versions_for(settings) as vs:  # v2 cannot be loaded (no weights): the replica keeps v1
            vs.publish({"base": settings.model, "parent": "v1", "method": "memit"}, _toy)
        body, _ = _wait_for(server.url, lambda b: b["versions"]["failures"] >= 1)  # then retried after 1, 2, 4... s
        assert body["model"].endswith("@v1") and body["absorbed_versions"] == ["v1"]
        log = server.log_tail(20000)
        assert "hot swap to the store's current model version failed; still serving" in log
        assert "(trying again in 1 s)" in log  # an NFS client may see a new folder late
        r = httpx.post(server.url + "/v1/completions", json={"model": "default", "prompt": "The capital of France is",
                                                               "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text

        r = CliRunner().invoke(models_app, ["rollback", "base", "--store", pg_url, "--home", str(tmp_path / "ops")],
                               env={"KEM_MODELS_DIR": str(models)})
        assert r.exit_code == 0, r.output
        body, _ = _wait_for(server.url, lambda b: b["absorbed_versions"] == [] and not b["model"].endswith("@v1"))
        assert body["versions"]["swaps"] == 2
    finally:
        server.stop()
