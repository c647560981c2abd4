"""Crash recovery of published versions (issue 12, "atomic publish"): a kill during publish leaves a
temporary folder, a kill between publishing vN and marking its edits leaves them active. recover()
(run when a job or a server starts) finishes both; nothing is consolidated twice."""

from __future__ import annotations

import time

from kem.edit import Edit, EditStatus
from kem.stores.sqlite import SQLiteStore
from kem.versions import VersionStore, recover


def _edit(i: int) -> Edit:
    return Edit(subject=f"Zorbex {i}", prompt="The CEO of {} is", target_new="Carla Diaz")


def test_recover_finishes_an_interrupted_publish(tmp_path):
    store = SQLiteStore(tmp_path / "edits.sqlite")
    versions = VersionStore(tmp_path)
    a, b, c = store.add_many([_edit(0), _edit(1), _edit(2)])
    # the job published v1 absorbing a and b, then was killed before marking them
    man = versions.publish({"base": "smollm2-135m-instruct", "method": "toy", "edit_ids": [a.id, b.id]},
                           lambda folder: (folder / "weights.bin").write_bytes(b"w"))
    time.sleep(0.01)
    store.update(b.id, {"target_new": "Dana Wu"})  # changed after v1 was published: not what v1 absorbed
    leftover = versions.root / ".tmp-v2-x1y2"  # a kill during the next publish
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"0" * 1024)
    assert store.get(a.id).status == EditStatus.active

    out = recover(versions, store)
    assert out.removed == (".tmp-v2-x1y2",) and not leftover.exists()
    assert out.marked == ((a.id, man.version),)
    got = store.get(a.id)
    assert got.status == EditStatus.consolidated and got.consolidated_in == "v1"
    assert store.get(b.id).status == EditStatus.active and store.get(c.id).status == EditStatus.active
    assert recover(versions, store).marked == ()  # idempotent
    assert [m.version for m in versions.list()] == ["v1"] and versions.current() == "v1"
    store.close()


def test_tenant_versions_live_apart_and_recover_covers_them(tmp_path):
    """``VersionStore(home, namespace)``: a tenant's versions under models/tenants/<ns>/, numbered on
    their own, labelled ``<ns>/vN`` in edits, never listed with the shared ones; recover() of the shared
    store repairs the tenants' interrupted publishes too."""
    import pytest

    from kem.errors import ValidationError

    store = SQLiteStore(tmp_path / "edits.sqlite")
    shared, alice, bob = VersionStore(tmp_path), VersionStore(tmp_path, "alice"), VersionStore(tmp_path, "bob")
    (a,) = store.add_many([_edit(0).model_copy(update={"namespace": "alice"})])
    shared.publish({"base": "m", "method": "toy"}, lambda f: None)
    man = alice.publish({"base": "m", "method": "toy", "parent": "v1", "edit_ids": [a.id]},
                        lambda f: (f / "adapter").mkdir())
    assert man.version == "v1" and man.kind == "adapter" and man.namespace == "alice" and man.parent == "v1"
    assert alice.root == tmp_path / "models" / "tenants" / "alice" and (alice.root / "v1" / "adapter").is_dir()
    assert [m.version for m in shared.list()] == ["v1"] and shared.manifest("v1").kind == "checkpoint"
    assert shared.tenants() == ["alice"] and bob.list() == [] and bob.current() is None
    assert alice.absorbed("v1") == frozenset({"alice/v1"}) and shared.absorbed("v1") == frozenset({"v1"})
    served = alice.resolve("current")
    assert served.parent == "v1" and served.namespace == "alice" and served.lora == alice.root / "v1" / "adapter"
    assert alice.adapter_on("v1") == served and alice.adapter_on(None) is None  # valid on its shared version only
    man2 = alice.publish({"base": "m", "method": "toy", "parent": "v1", "tenant_parent": "v1"}, lambda f: None)
    assert alice.absorbed(man2.version) == frozenset({"alice/v1", "alice/v2"}) and shared.next_version() == "v2"
    alice.rollback("v1")
    assert alice.current() == "v1" and shared.current() == "v1"
    with pytest.raises(ValidationError) as err:
        VersionStore(tmp_path, "../etc")
    assert err.value.field == "namespace"

    # a tenant job killed during publish and before marking its edits
    (alice.root / ".tmp-v3-zz").mkdir()
    out = recover(shared, store)
    assert out.removed == ("tenants/alice/.tmp-v3-zz",) and out.marked == ((a.id, "alice/v1"),)
    assert store.get(a.id).consolidated_in == "alice/v1"
    store.close()
