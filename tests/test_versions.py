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
