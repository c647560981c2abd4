"""The keys file: parsing, hashed entries, per-key limits, and rewrites that keep it whole and private."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from kem.errors import AuthError, ValidationError
from kem.files import write_atomic
from kem.server.auth import KeyRing, digest, parse_keys
from kem.server.limits import KeyLimits


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "keys.txt"
    p.write_text(f"# test keys\nsk-alice alice\nsha256:{digest('sk-bob')} bob   # hashed\nsk-root *\n")
    p.chmod(0o600)
    return p


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_clear_and_hashed_entries_authenticate(keys_file: Path) -> None:
    ring = KeyRing(keys_file)
    assert ring.authenticate(bearer("sk-alice")).namespace == "alice"
    bob = ring.authenticate(None, api_key="sk-bob")
    assert (bob.namespace, bob.admin, bob.key_id) == ("bob", False, digest("sk-bob")[:12])
    root = ring.authenticate(bearer("sk-root"))
    assert (root.namespace, root.admin) == ("default", True)
    with pytest.raises(AuthError):
        ring.authenticate(bearer("sk-nobody"))
    with pytest.raises(AuthError):
        ring.authenticate(None)


def test_revoke_keeps_the_files_mode(keys_file: Path) -> None:
    """Regression: revoking rewrote the keys file (clear-text keys inside) as 0644."""
    old_umask = os.umask(0o022)
    try:
        ring = KeyRing(keys_file)
        assert ring.revoke(digest("sk-bob")[:12]) == 1
    finally:
        os.umask(old_umask)
    assert mode(keys_file) == 0o600
    assert "sk-alice alice" in keys_file.read_text() and digest("sk-bob") not in keys_file.read_text()
    assert not [p for p in keys_file.parent.iterdir() if p != keys_file], "no temporary file left behind"
    with pytest.raises(AuthError):
        KeyRing(keys_file).authenticate(bearer("sk-bob"))


def test_other_modes_are_kept_too(keys_file: Path) -> None:
    keys_file.chmod(0o640)
    KeyRing(keys_file).create("carol")
    assert mode(keys_file) == 0o640


def test_create_on_a_file_without_trailing_newline(tmp_path: Path) -> None:
    """Regression: the new entry was glued to the last line, and the server no longer started."""
    p = tmp_path / "keys.txt"
    p.write_text("sk-alice alice")  # no newline at the end
    key = KeyRing(p).create("carol")
    ring = KeyRing(p)  # a restart reads the file again
    assert ring.authenticate(bearer("sk-alice")).namespace == "alice"
    assert ring.authenticate(bearer(key)).namespace == "carol"


def test_created_keys_are_stored_hashed_and_returned_once(keys_file: Path) -> None:
    key = KeyRing(keys_file).create("carol", admin=True)
    text = keys_file.read_text()
    assert key not in text
    assert f"sha256:{digest(key)} carol admin" in text
    assert KeyRing(keys_file).authenticate(bearer(key)).admin


def test_create_keeps_hand_edits_made_since_start(keys_file: Path) -> None:
    ring = KeyRing(keys_file)
    with keys_file.open("a") as f:
        f.write("sk-dave dave\n")
    ring.create("carol")
    assert "sk-dave dave" in keys_file.read_text()


def test_hash_clear_keys(keys_file: Path) -> None:
    keys_file.write_text(keys_file.read_text() + "  sk-ops ops admin rpm=5  # ops team\n")
    ring = KeyRing(keys_file)
    assert ring.hash_clear_keys() == 3
    text = keys_file.read_text()
    for key in ("sk-alice", "sk-root", "sk-ops"):
        assert key not in text and f"sha256:{digest(key)}" in text
    assert "# test keys" in text and "# ops team" in text and "# hashed" in text
    again = KeyRing(keys_file)
    assert all(e.hashed for e in parse_keys(text).values())
    ops = again.authenticate(bearer("sk-ops"))
    assert (ops.namespace, ops.admin, ops.limits.rpm) == ("ops", True, 5)
    assert again.hash_clear_keys() == 0
    assert mode(keys_file) == 0o600


def test_per_key_limits_are_parsed(tmp_path: Path) -> None:
    p = tmp_path / "keys.txt"
    p.write_text("sk-a a rpm=60 tpm=20000 parallel=2\nsk-b b admin tpm=100\nsk-c c\n")
    ring = KeyRing(p)
    assert ring.authenticate(bearer("sk-a")).limits == KeyLimits(rpm=60, tpm=20000, parallel=2)
    b = ring.authenticate(bearer("sk-b"))
    assert b.admin and b.limits == KeyLimits(tpm=100)
    assert ring.authenticate(bearer("sk-c")).limits == KeyLimits()
    assert {"id": digest("sk-a")[:12], "namespace": "a", "admin": False, "rpm": 60, "tpm": 20000,
            "parallel": 2} in ring.list()


def test_create_with_limits_round_trips(keys_file: Path) -> None:
    key = KeyRing(keys_file).create("carol", limits=KeyLimits(rpm=10, parallel=1))
    assert KeyRing(keys_file).authenticate(bearer(key)).limits == KeyLimits(rpm=10, parallel=1)


@pytest.mark.parametrize("line", [
    "sk-a", "sk-a a root", "sk-a a rpm=0", "sk-a a rpm=-1", "sk-a a rpm=x", "sk-a a rpm=1 rpm=2",
    "sk-a a burst=3", "sha256:abc a", "sk-a not/a/namespace", "sk-a a tpm=1.5",
])
def test_bad_lines_name_the_line(tmp_path: Path, line: str) -> None:
    p = tmp_path / "keys.txt"
    p.write_text(f"# header\n{line}\n")
    with pytest.raises(ValidationError, match="line 2") as info:
        KeyRing(p)
    assert info.value.field == "keys"


def test_revoke_needs_8_digits_and_removes_only_matches(keys_file: Path) -> None:
    ring = KeyRing(keys_file)
    with pytest.raises(ValidationError):
        ring.revoke("abc")
    assert ring.revoke("00000000") == 0
    before = keys_file.read_text()
    assert ring.revoke(digest("sk-alice")[:8].upper()) == 1
    after = keys_file.read_text()
    assert after == before.replace("sk-alice alice\n", "")


def test_concurrent_creates_all_land(keys_file: Path) -> None:
    ring = KeyRing(keys_file)
    made: list[str] = []
    threads = [threading.Thread(target=lambda: made.append(ring.create("carol"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = KeyRing(keys_file)
    assert all(again.authenticate(bearer(k)).namespace == "carol" for k in made) and len(made) == 16


def test_write_atomic_new_file_is_private_and_failed_write_leaves_old(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "new.txt"
    old_umask = os.umask(0)
    try:
        write_atomic(p, "x\n")
    finally:
        os.umask(old_umask)
    assert mode(p) == 0o600 and p.read_text() == "x\n"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(p, "y\n")
    assert p.read_text() == "x\n"
    assert [q.name for q in tmp_path.iterdir()] == ["new.txt"]


def test_write_atomic_through_a_symlink_replaces_the_target(tmp_path: Path) -> None:
    target = tmp_path / "real.txt"
    target.write_text("a\n")
    target.chmod(0o600)
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    write_atomic(link, "b\n")
    assert link.is_symlink() and target.read_text() == "b\n" and mode(target) == 0o600


def test_auth_off() -> None:
    ring = KeyRing(None)
    p = ring.authenticate(None)
    assert (p.namespace, p.admin, p.key_id, p.limits) == ("default", True, "", KeyLimits())
    with pytest.raises(ValidationError):
        ring.create("carol")


def test_review_keys_in_the_file_and_when_created(tmp_path: Path) -> None:
    p = tmp_path / "keys.txt"
    p.write_text("sk-intern interns review rpm=5\nsk-alice alice\n")
    entries = parse_keys(p.read_text())
    assert entries[digest("sk-intern")].review and not entries[digest("sk-alice")].review
    ring = KeyRing(p)
    intern = ring.authenticate(bearer("sk-intern"))
    assert intern.review and intern.limits.rpm == 5 and intern.actor.startswith("key:") and intern.actor.endswith("@interns")
    assert not ring.authenticate(bearer("sk-alice")).review
    new = ring.create("interns", review=True)
    assert KeyRing(p).authenticate(bearer(new)).review  # written to the file as "review"
    assert any(r.get("review") for r in KeyRing(p).list())
    with pytest.raises(ValidationError, match="review"):
        parse_keys("sk-x ns review=yes\n")
