"""``kem serve``'s logic without HTTP: :class:`kem.server.serving.Serving` (its edits API, a completion
on the real SmolLM2, reload of model versions) and the torch-free :class:`kem.versions.VersionStore`
it resolves versions with. tests/test_server.py checks the same surface over real HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kem.edit import Edit
from kem.editor import KnowledgeEditor
from kem.errors import ConflictError, ForbiddenError, NotFoundError, ValidationError
from kem.protocols import ForwardingEngine, GenerationParams, Reloadable
from kem.server.auth import Principal
from kem.server.protocol import CompletionRequest, ReloadRequest
from kem.server.serving import Serving
from kem.versions import VersionStore

ALICE, BOB, ADMIN = Principal("alice"), Principal("bob"), Principal("default", admin=True)
CEO = "The CEO of Kem Corporation is"
KEM_CEO = {"subject": "Kem Corporation", "prompt": "The CEO of {} is", "target_new": "Alice Zhang"}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture()
def editor(tmp_path, generator, embedder, kem_settings):
    settings = kem_settings.model_copy(update={"home": tmp_path / "home"})
    with KnowledgeEditor.open(settings=settings, generator=generator, embedder=embedder) as ke:
        yield ke


@pytest.fixture()
def serving(editor, generator):
    return Serving(editor, generator, reloader=lambda req, current: current)  # weights "reloaded" in place


def publish_base_as(home: Path, parent: str | None, settings) -> str:
    """Publish the base model's files (linked) as a new version: they stand in for consolidated weights."""
    from kem.models import resolve_model

    folder = resolve_model(settings.model, settings.cache_dir)

    def write(tmp: Path) -> None:
        for f in folder.iterdir():
            (tmp / f.name).symlink_to(f)

    return VersionStore(home).publish({"base": settings.model, "parent": parent, "method": "memit"}, write).version


# ---- the edits API ------------------------------------------------------------------------------------
def test_edits_create_get_list_page_update_delete_history(serving):
    edits = serving.edits
    made = [run(edits.create(ALICE, {"subject": f"Planet {i}", "prompt": "The moon count of {} is",
                                     "target_new": str(i)})) for i in range(5)]
    assert all(e["object"] == "edit" and e["namespace"] == "alice" for e in made)
    page = run(edits.list(ALICE, limit=2))
    assert page.total == 5 and [e["id"] for e in page.data] == [e["id"] for e in made[:2]] and page.next_offset == 2
    last = run(edits.list(ALICE, limit=2, offset=4))
    assert len(last.data) == 1 and last.next_offset is None
    assert run(edits.list(BOB)).total == 0  # namespaces never meet
    eid = made[0]["id"]
    assert run(edits.get(ALICE, eid))["target_new"] == "0"
    with pytest.raises(NotFoundError):
        run(edits.get(BOB, eid))
    assert run(edits.update(ALICE, eid, {"target_new": "42"}))["target_new"] == "42"
    assert [c["op"] for c in run(edits.history(ALICE, eid))["data"]] == ["add", "update"]
    assert run(edits.delete(ALICE, eid)) == {"object": "edit.deleted", "id": eid, "deleted": True}
    with pytest.raises(NotFoundError):
        run(edits.get(ALICE, eid))
    # an admin sees every namespace unless it picks one; a tenant may not pick another
    run(edits.create(BOB, KEM_CEO))
    assert run(edits.list(ADMIN)).total == 5 and run(edits.list(ADMIN, "bob")).total == 1
    assert run(edits.list(ADMIN, status="active", limit=1)).next_offset == 1
    with pytest.raises(ForbiddenError):
        run(edits.list(BOB, "alice"))
    with pytest.raises(ForbiddenError):
        run(edits.create(BOB, {**KEM_CEO, "namespace": "alice"}))


@pytest.mark.parametrize(("call", "field"), [
    (lambda e: e.create(ALICE, ["not", "an", "object"]), "body"),
    (lambda e: e.create(ALICE, {"subject": "Mars", "prompt": "The colour of {} is"}), "target_new"),
    (lambda e: e.list(ALICE, limit=0), "limit"),
    (lambda e: e.list(ALICE, offset=-1), "offset"),
    (lambda e: e.list(ALICE, status="sleeping"), "status"),
    (lambda e: e.update(ALICE, "x", {}), "body"),
    (lambda e: e.update(ALICE, "x", {"id": "y"}), "id"),
])
def test_edits_validation_names_the_field(serving, call, field):
    with pytest.raises(ValidationError) as info:
        run(call(serving.edits))
    assert info.value.field == field


def test_import_json_and_json_lines_all_or_none(serving):
    edits = serving.edits
    rows = [{"subject": f"Star {i}", "prompt": "The colour of {} is", "target_new": "blue"} for i in range(3)]
    out = run(edits.import_edits(ALICE, json.dumps({"edits": rows}).encode(), "application/json"))
    assert out.created == 3 and len(out.ids) == 3
    lines = "\n".join(json.dumps({**r, "subject": r["subject"] + "b"}) for r in rows) + "\n\n"
    out = run(edits.import_edits(ADMIN, lines.encode(), "application/x-ndjson", namespace="bob"))
    assert out.created == 3 and run(edits.list(BOB)).total == 3
    with pytest.raises(ValidationError) as info:
        run(edits.import_edits(ALICE, json.dumps([rows[0], {"subject": "Mars", "prompt": "no subject"}]).encode()))
    assert info.value.field.startswith("edits[1].") and "edits[1]" in str(info.value)
    assert run(edits.list(ALICE)).total == 3  # all or none
    for raw, ctype, field in ((b"{not json", "application/json", "body"), (b"{\n", "application/jsonl", "body"),
                              (b"[]", "application/json", "edits"), (b'{"edits": 3}', "", "edits"),
                              (b"[1]", "", "edits[0]")):
        with pytest.raises(ValidationError) as info:
            run(edits.import_edits(ALICE, raw, ctype))
        assert info.value.field == field, raw


# ---- completions --------------------------------------------------------------------------------------
def test_completion_applies_edits_and_leaves_others_alone(serving, generator):
    def complete(prompt: str, ns: str = "alice"):
        body = {"model": "default", "prompt": prompt, "max_tokens": 6, "temperature": 0}
        raw = json.dumps(body).encode()
        return run(serving.serve(CompletionRequest.model_validate_json(raw), raw, ns))

    plain = complete("Water boils at")
    assert plain.applied == [] and plain.header() == "" and plain.body["kem"]["edits"] == []
    assert plain.body["choices"][0]["text"] == generator.generate("Water boils at", GenerationParams(max_new_tokens=6))
    edit = run(serving.edits.create(ALICE, KEM_CEO))
    res = complete(CEO)
    assert res.body["choices"][0]["text"].strip().startswith("Alice Zhang"), res.body
    assert res.header().startswith(edit["id"] + ":") and res.namespace == "alice"
    assert [e["id"] for e in res.body["kem"]["edits"]] == [edit["id"]]
    assert complete(CEO, "bob").applied == []  # another namespace's edit
    assert serving.metrics.model == generator.name and not serving.forwarding


# ---- reload -------------------------------------------------------------------------------------------
def test_reload_switches_absorbed_versions(serving, editor, kem_settings):
    home = editor.settings.home
    v1 = publish_base_as(home, None, kem_settings)
    v2 = publish_base_as(home, v1, kem_settings)
    assert (v1, v2) == ("v1", "v2") and VersionStore(home).current() == "v2"
    # an edit consolidation baked into v1 (stored by the job, not through the API: clients cannot set it)
    baked = editor.add(Edit.parse({**KEM_CEO, "namespace": "alice", "status": "consolidated",
                                   "consolidated_in": "v1"})).model_dump()
    assert [s.edit.id for s in editor.retrieve(CEO, "alice")] == [baked["id"]]

    out = run(serving.reload(ReloadRequest(version="current")))  # what models/current points at
    assert out["version"] == "v2" and out["absorbed_versions"] == ["v1", "v2"] and out["status"] == "ok"
    assert editor.absorbed_versions == {"v1", "v2"} and editor.retrieve(CEO, "alice") == []
    assert serving.health()["absorbed_versions"] == ["v1", "v2"] and serving.metrics.reloads == 1
    with pytest.raises(NotFoundError):
        run(serving.reload(ReloadRequest(version="v7")))  # not published
    assert editor.absorbed_versions == {"v1", "v2"}
    # only the absorbed versions change: no engine reload
    out = run(serving.reload(ReloadRequest(absorbed_versions=["v9"])))
    assert out["absorbed_versions"] == ["v9"] and out["seconds"] == 0.0 and serving.metrics.reloads == 1
    # back to the base model: the edits v1 absorbed are applied in context again
    out = run(serving.reload(ReloadRequest(version="base")))
    assert out["absorbed_versions"] == [] and editor.absorbed_versions == frozenset()
    assert [s.edit.id for s in editor.retrieve(CEO, "alice")] == [baked["id"]]
    # a folder by path, plus the (unpublished) version its weights hold
    out = run(serving.reload(ReloadRequest(path=str(VersionStore(home).path("v1")), version="v5")))
    assert out["absorbed_versions"] == ["v5"]


def test_reload_without_a_reloader_changes_only_absorbed_versions(editor, generator):
    serving = Serving(editor, generator)
    assert run(serving.reload(ReloadRequest(absorbed_versions=["v3"])))["absorbed_versions"] == ["v3"]
    with pytest.raises(ValidationError) as info:
        run(serving.reload(ReloadRequest(version="base")))  # in-process: base needs a new engine
    assert info.value.field == "path" and editor.absorbed_versions == {"v3"}


def test_engine_protocols(generator):
    from kem.adapters.openai_http import OpenAIHTTPGenerator

    http = OpenAIHTTPGenerator("http://127.0.0.1:9/v1", model="up")  # no request is made
    try:
        assert isinstance(http, ForwardingEngine) and not isinstance(http, Reloadable)
        assert not isinstance(generator, ForwardingEngine) and not isinstance(generator, Reloadable)
        # per-request adapters: the transformers engine always; upstream mode only with runtime LoRA
        from kem.adapters.base import to_async
        from kem.protocols import runs_loras

        assert runs_loras(generator) and runs_loras(to_async(generator))
        assert not runs_loras(http) and not runs_loras(object())
    finally:
        run(http.aclose())


# ---- the version store --------------------------------------------------------------------------------
def test_version_store_resolve_ancestors_rollback(tmp_path, kem_settings):
    vs = VersionStore(tmp_path)
    assert vs.list() == [] and vs.current() is None and vs.next_version() == "v1"
    assert vs.resolve("current").version == "base" and vs.resolve("base").absorbed == frozenset()
    v1 = publish_base_as(tmp_path, None, kem_settings)
    assert "v2" == publish_base_as(tmp_path, v1, kem_settings)
    v3 = vs.publish({"base": "m", "parent": v1, "method": "rome"}, lambda folder: None, make_current=False)
    assert [m.version for m in vs.list()] == ["v1", "v2", "v3"] and vs.current() == "v2"
    assert vs.ancestors("v2") == ["v2", "v1"] and vs.absorbed("v3") == {"v3", "v1"}
    served = vs.resolve("current")
    assert served.version == "v2" and served.path == tmp_path / "models" / "v2" and served.absorbed == {"v1", "v2"}
    assert vs.is_published("v3") and vs.is_published("base") and not vs.is_published("v4")
    assert not vs.is_published("latest") and v3.version == "v3"
    assert vs.rollback("v1").version == "v1" and vs.current() == "v1"
    assert vs.rollback("base") is None and vs.current() is None
    with pytest.raises(NotFoundError, match="does not exist"):
        vs.rollback("v9")
    with pytest.raises(ValidationError, match="vN"):
        vs.resolve("latest")
    assert vs.current() is None  # failed rollbacks moved nothing


def test_version_store_publish_is_atomic_and_cycles_are_refused(tmp_path):
    vs = VersionStore(tmp_path)

    def half_written(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        vs.publish({"base": "m", "method": "memit"}, half_written)
    assert vs.list() == [] and vs.current() is None and not [p for p in vs.root.iterdir() if p.name != ".publish.lock"]
    vs.publish({"base": "m", "method": "memit", "parent": "v2"}, lambda folder: None)
    vs.publish({"base": "m", "method": "memit", "parent": "v1"}, lambda folder: None)
    with pytest.raises(ConflictError, match="cycle"):
        vs.resolve("v2")


def test_version_store_imports_no_torch():
    code = "import sys, kem.versions; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
