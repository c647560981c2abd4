"""The CLI in real subprocesses: each command is a fresh process on the same SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_data


def kem(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEM_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "kem", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if ok:
        assert proc.returncode == 0, f"kem {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def kem_json(home: Path, *args: str) -> object:
    return json.loads(kem(home, *args, "--json").stdout)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli") / "kem-data"


def test_add_list_show_rm_across_processes(home):
    a = kem_json(home, "edit", "add", "--subject", "Danielle Darrieux", "--prompt", "The mother tongue of {} is",
                 "--target", "English", "--relation", "P103", "--paraphrase",
                 "Where Danielle Darrieux is from, people speak the language of")
    assert a["status"] == "active" and a["namespace"] == "default" and len(a["paraphrases"]) == 1
    b = kem_json(home, "edit", "add", "--subject", "Apple A5", "--prompt", "Apple A5 was created by",
                 "--target", "Google", "--namespace", "alice")
    assert b["prompt"] == "{} was created by" and b["namespace"] == "alice"
    rows = kem_json(home, "edit", "list")
    assert {r["id"] for r in rows} == {a["id"], b["id"]}
    assert [r["id"] for r in kem_json(home, "edit", "list", "--namespace", "alice")] == [b["id"]]
    shown = kem_json(home, "edit", "show", a["id"])
    assert shown["target_new"] == "English" and [h["op"] for h in shown["history"]] == ["add"]
    # supersede: same subject + relation
    c = kem_json(home, "edit", "add", "--subject", "Danielle Darrieux", "--prompt", "The mother tongue of {} is",
                 "--target", "English", "--relation", "P103")
    assert c["supersedes"] == [a["id"]]
    assert kem_json(home, "edit", "show", a["id"])["status"] == "superseded"
    # another namespace cannot delete alice's edit; alice can
    assert kem(home, "edit", "rm", b["id"], "--namespace", "bob", ok=False).returncode == 2
    assert kem_json(home, "edit", "rm", b["id"], "--namespace", "alice") == {"deleted": b["id"]}
    err = kem(home, "edit", "show", b["id"], ok=False)
    assert err.returncode == 2 and b["id"] in err.stderr


def test_bad_edit_rejected_store_unchanged(home):
    before = kem_json(home, "edit", "list")
    proc = kem(home, "edit", "add", "--subject", "Nobody", "--prompt", "The sky is", "--target", "green", ok=False)
    assert proc.returncode == 2
    assert "Edit.prompt" in proc.stderr and "{}" in proc.stderr
    bad = home.parent / "bad.jsonl"
    bad.write_text(json.dumps({"subject": "A", "prompt": "{} is", "target_new": "x"}) + "\n"
                   + json.dumps({"subject": "B", "prompt": "{} is"}) + "\n")
    proc = kem(home, "edit", "import", str(bad), "--strict", ok=False)
    assert proc.returncode == 2 and "record 1" in proc.stderr and "target_new" in proc.stderr
    assert kem_json(home, "edit", "list") == before
    # without --strict the valid record is imported and the invalid one named
    out = kem_json(home, "edit", "import", str(bad), "--namespace", "partial")
    assert out["imported"] == 1 and [(e["index"], e["field"]) for e in out["skipped"]] == [(1, "target_new")]
    assert kem(home, "edit", "rm", out["ids"][0], "--namespace", "partial").returncode == 0


def test_import_counterfact_and_ask_json(home):
    out = kem_json(home, "edit", "import", shared_data("counterfact", "counterfact-edit.json"), "--limit", "20",
                   "--namespace", "cf")
    assert out["imported"] == 20
    ans = kem_json(home, "ask", "--complete", "--namespace", "cf", "--max-new-tokens", "6",
                   "The mother tongue of Danielle Darrieux is")
    assert set(ans) >= {"text", "edits", "model"} and ans["model"] == "smollm2-135m-instruct"
    assert "English" in ans["text"] and len(ans["edits"]) == 1
    assert set(ans["edits"][0]) >= {"id", "score"} and ans["edits"][0]["score"] > 0.5
    plain = kem_json(home, "ask", "--complete", "--namespace", "cf", "--max-new-tokens", "6", "--no-edits",
                     "The mother tongue of Danielle Darrieux is")
    assert "English" not in plain["text"] and plain["edits"] == []
    # the index is derived: delete it and the next process rebuilds it from the SQLite file
    shutil.rmtree(home / "index")
    again = kem_json(home, "ask", "--complete", "--namespace", "cf", "--max-new-tokens", "6",
                     "The mother tongue of Danielle Darrieux is")
    assert again["text"] == ans["text"] and [e["id"] for e in again["edits"]] == [e["id"] for e in ans["edits"]]
    assert (home / "index").is_dir()


def test_usage_errors_are_one_clear_message_not_a_traceback(home):
    for args, needle in ((["eval", "--mode", "serial"], "--mode"),
                         (["consolidate", "-H", "values.nope=3", "--dry-run"], "values.nope"),
                         (["consolidate", "-H", "novalue", "--dry-run"], "KEY=VALUE")):
        p = kem(home, *args, ok=False)
        assert p.returncode == 2, (args, p.stderr)
        assert "Invalid value for --" in p.stderr and needle in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr, (args, p.stderr)


def test_errors_exit_non_zero_with_one_message(home, tmp_path):
    """A KemError prints ``error: ...`` and exits 2 (``kem eval`` used to print it and exit 0)."""
    for args, needle in ((["eval", "--dataset", str(tmp_path / "missing.json"), "--method", "none"], "no file at"),
                         (["eval", "--dataset", "zsre", "--data-dir", str(tmp_path)], "no file at"),
                         (["eval", "--dataset", "zsre", "--method", "no-such-method", "-n", "1"], "no-such-method"),
                         (["edit", "import", str(tmp_path / "missing.jsonl")], "no file at")):
        p = kem(home, *args, ok=False)
        assert p.returncode == 2, (args, p.returncode, p.stderr[-2000:])
        assert p.stderr.strip().splitlines()[-1].startswith("error: ") and needle in p.stderr, (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, (args, p.stderr[-2000:])


def test_facts_over_time_on_the_command_line(tmp_path):
    home = tmp_path / "kem-data"
    ceo = ("edit", "add", "--subject", "Kem Corporation", "--prompt", "The CEO of {} is")
    one = kem_json(home, *ceo, "--target", "Alice Smith", "--valid-from", "2020-01-01",
                   "--evidence", "https://example.com/2020")
    two = kem_json(home, *ceo, "--target", "Bob Jones", "--valid-from", "2024-01-01")
    assert two["supersedes"] == [one["id"]] and one["evidence"] == "https://example.com/2020"
    assert one["created_by"].startswith("cli:")
    refused = kem(home, *ceo, "--target", "Carol White", "--on-conflict", "reject", ok=False)
    assert refused.returncode == 2 and two["id"] in refused.stderr
    assert [e["id"] for e in kem_json(home, "edit", "list", "--status", "superseded")] == [one["id"]]
    assert [e["id"] for e in kem_json(home, "edit", "list", "--as-of", "2022-06-01")] == [one["id"]]
    bad = kem(home, "edit", "list", "--as-of", "someday", ok=False)
    assert bad.returncode == 2 and "--as-of" in bad.stderr
    pend = kem_json(home, *ceo, "--target", "Dana Lee", "--review")
    assert pend["status"] == "pending"
    assert kem_json(home, "edit", "approve", pend["id"])["supersedes"] == [two["id"]]
    rows = [json.loads(line) for line in kem(home, "audit", "--json").stdout.splitlines()]
    assert [r["op"] for r in rows] == ["add", "supersede", "add", "add", "supersede", "approve"]
    assert all(r["actor"].startswith("cli:") for r in rows)


def test_a_command_whose_module_cannot_load_says_why(tmp_path):
    """Without fastapi (the ``server`` extra), ``kem --help`` still lists ``serve``, marked unavailable
    with the reason, and running it names what to install and exits 2; the other commands are there."""
    blocker = tmp_path / "sitecustomize.py"  # loaded at start-up: fastapi cannot be imported
    blocker.write_text("import sys\n\nclass _NoFastapi:\n"
                       "    def find_spec(self, name, path=None, target=None):\n"
                       "        if name == 'fastapi' or name.startswith('fastapi.'):\n"
                       "            raise ImportError(\"No module named 'fastapi'\", name='fastapi')\n"
                       "        return None\n\nsys.meta_path.insert(0, _NoFastapi())\n")
    env = {**os.environ, "KEM_HOME": str(tmp_path / "home"), "PYTHONPATH": str(tmp_path), "COLUMNS": "200"}
    run = [sys.executable, "-m", "kem"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert helped.returncode == 0, helped.stderr
    lines = {ln.split()[1]: ln for ln in helped.stdout.splitlines() if ln.startswith("│ ") and len(ln.split()) > 2}
    assert "unavailable" in lines["serve"] and "fastapi" in lines["serve"] and "kem[server]" in lines["serve"]
    assert "unavailable" not in lines["keys"]  # a keys file needs no web framework
    assert "unavailable" not in lines["edit"] and "unavailable" not in lines["consolidate"]
    served = subprocess.run([*run, "serve", "--port", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert served.returncode == 2 and "kem serve is unavailable" in served.stderr and "kem[server]" in served.stderr


def test_kem_follower_keeps_its_earlier_name_hidden(home):
    """``kem follower`` manages the edit-follower LoRA; ``kem adapter`` still works and is not listed."""
    listed = kem(home, "--help").stdout
    assert "follower" in listed and " adapter " not in listed
    new, old = kem(home, "follower", "show"), kem(home, "adapter", "show")
    assert new.stdout == old.stdout and json.loads(new.stdout)["kind"] == "kem edit-follower (LoRA)"
