"""The consolidation job (issue 4) on the real SmolLM2-135M-Instruct, on CPU: publish, versions,
rollback, failure safety, gates, and ``kem ask --model-version v1 --no-edits`` through the CLI.

The tests of this module share one KEM_HOME. The ``published`` fixture publishes v1 once (whichever
test asks first) and ``pending`` makes sure an edit waits for the next job, so any subset of the
tests runs on its own; failures and gate refusals must leave v1 and the store untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kem.consolidation import version_weights as V
from kem.consolidation.job import Gates, consolidate, pending_edits
from kem.consolidation.judge import default_probes
from kem.edit import Edit, EditStatus
from kem.errors import ValidationError
from kem.versions import DELTA, MANIFEST, VersionStore

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("../shared/data")
WIKITEXT = DATA / "wikitext-2" / "valid.txt"
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
COV = {"mom2_samples": 200}  # the same cached statistics as tests/test_consolidation.py
CHEAP = {**COV, "values": {"steps": 1, "lr": 1e-4}}  # values barely move: fast, and edits are not carried
PROBES = default_probes()[:10]  # fewer held-out probes than the default 40, to keep the tests short


def _edits(idx: list[int], namespace: str = "cf") -> list[Edit]:
    recs = json.loads(COUNTERFACT.read_text())
    return [Edit(subject=recs[i]["subject"], prompt=recs[i]["prompt"], target_new=recs[i]["target_new"],
                 target_true=recs[i]["ground_truth"], namespace=namespace, source=f"counterfact:{i}") for i in idx]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Generation-heavy module: one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def home(tmp_path_factory, lm_and_tok):
    """A KEM_HOME whose store holds two CounterFact edits (no embeddings: the job needs none)."""
    from kem.stores.sqlite import SQLiteStore

    h = tmp_path_factory.mktemp("kem-home")
    store = SQLiteStore(h / "edits.sqlite")
    store.add_many(_edits([0, 1]))
    store.close()
    return h


@pytest.fixture(scope="module")
def settings(home):
    from kem.settings import Settings

    return Settings(home=home, device="cpu", shared_namespaces="cf")  # the edits here are shared facts


@pytest.fixture(scope="module")
def published(home, settings):
    """The job's result when it publishes v1 from the two edits of ``home``."""
    assert VersionStore(home).current() is None
    return consolidate(settings, method="memit", corpus=WIKITEXT, hparams=COV)


@pytest.fixture
def pending(home, published):
    """v1 is published and CounterFact case 2 waits for the next job (added once)."""
    store = _store(home)
    try:
        if not [e for e in store.list("cf") if e.source == "counterfact:2"]:
            store.add_many(_edits([2]))
    finally:
        store.close()


def _store(home: Path):
    from kem.stores.sqlite import SQLiteStore

    return SQLiteStore(home / "edits.sqlite")


def _snapshot(home: Path) -> dict:
    """Everything a failed job must not change: edits, their history, the version folders, current."""
    store = _store(home)
    try:
        edits = {e.id: e.model_dump(mode="json") for e in store.list()}
        hist = {i: len(store.history(i)) for i in edits}
    finally:
        store.close()
    root = VersionStore(home).root
    files = {}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.endswith(".lock"):
                st = p.stat()
                files[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return {"edits": edits, "history": hist, "files": files, "current": VersionStore(home).current()}


def test_job_publishes_v1_and_marks_edits(home, settings, published):
    res = published
    assert res.published, res.message
    assert res.version == "v1" and res.parent is None
    assert res.metrics["reliability"] >= Gates().min_reliability and res.metrics["locality"] >= Gates().min_locality, res.metrics
    assert VersionStore(home).current() == "v1"
    man = VersionStore(home).manifest("v1")
    assert man.method == "memit" and man.parent is None and man.base == settings.model
    assert set(man.edit_ids) == set(res.absorbed_ids) and man.hparams["mom2_samples"] == 200
    assert {"load", "compute", "evaluate"} <= set(man.timings)
    folder = VersionStore(home).path("v1")
    assert (folder / "model.safetensors").is_file() and (folder / DELTA).is_file()
    assert not [p for p in VersionStore(home).root.iterdir() if p.name.startswith(".tmp-")]

    store = _store(home)
    try:
        for i in res.absorbed_ids:
            e = store.get(i)
            assert e.status == EditStatus.consolidated and e.consolidated_in == "v1"
            assert store.history(i)[-1].op == "consolidate"
        job_ids = set(res.absorbed_ids) | set(res.failed_ids)  # other tests may have added edits since
        assert {e.id for e in pending_edits(store, VersionStore(home).absorbed("v1"), "cf")} & job_ids == set(res.failed_ids)
    finally:
        store.close()

    # the published folder is a plain HF model whose greedy answer carries the edit
    from kem.consolidation.judge import greedy

    model, tok = V.load_version(home, "v1", settings)
    case0 = _edits([0])[0]
    assert "English" in greedy(model, tok, [case0.rendered_prompt], 4)[0]


def test_failure_after_apply_leaves_store_and_versions_untouched(home, settings, pending, monkeypatch):
    import kem.consolidation.job as job

    before = _snapshot(home)

    def boom(*a, **k):
        raise RuntimeError("injected after applying the deltas")

    monkeypatch.setattr(job, "ask_forms", boom)  # runs after apply_delta, before publish
    with pytest.raises(RuntimeError, match="injected"):
        consolidate(settings, method="memit", corpus=WIKITEXT, hparams=CHEAP, probes=PROBES)
    assert _snapshot(home) == before


def test_failure_while_publishing_leaves_no_partial_version(home, settings, pending, monkeypatch):
    from kem.consolidation.delta import WeightDelta

    before = _snapshot(home)

    def boom(self, path):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(WeightDelta, "save", boom)
    # steps=1 keeps it cheap; gates at 0 so the job reaches publish
    with pytest.raises(OSError, match="injected"):
        consolidate(settings, method="memit", corpus=WIKITEXT, hparams=CHEAP,
                    gates=Gates(0.0, 0.0), probes=PROBES)
    assert _snapshot(home) == before
    assert not [p for p in VersionStore(home).root.iterdir() if p.name.startswith(".tmp-")]


def test_gate_failure_publishes_nothing_and_says_why(home, settings, pending):
    before = _snapshot(home)
    res = consolidate(settings, method="memit", corpus=WIKITEXT, hparams=CHEAP, probes=PROBES)
    assert not res.published and res.gate_failed
    assert any("reliability" in r for r in res.reasons), res.reasons
    assert "nothing published" in res.message and res.metrics["failed_edits"]
    assert _snapshot(home) == before


def test_dry_run_publishes_nothing(home, settings, pending):
    before = _snapshot(home)
    res = consolidate(settings, method="memit", corpus=WIKITEXT, hparams=CHEAP,
                      gates=Gates(0.0, 0.0), dry_run=True, probes=PROBES)
    assert res.dry_run and not res.published and not res.reasons and res.version == "v2"
    assert _snapshot(home) == before


def test_rollback_returns_edits_to_the_fast_path(home, published):
    store = _store(home)
    try:
        absorbed_v1 = [e.id for e in store.list("cf", EditStatus.consolidated)]
        assert absorbed_v1
        assert not {e.id for e in pending_edits(store, VersionStore(home).absorbed("v1"))} & set(absorbed_v1)
        VersionStore(home).rollback("base")
        assert VersionStore(home).current() is None and VersionStore(home).absorbed(None) == frozenset()
        assert set(absorbed_v1) <= {e.id for e in pending_edits(store, VersionStore(home).absorbed(None))}
        VersionStore(home).rollback("v1")
        assert VersionStore(home).current() == "v1" and VersionStore(home).ancestors("v1") == ["v1"]
    finally:
        store.close()
    assert (VersionStore(home).root / "v1" / MANIFEST).is_file()  # rollback never deletes
    with pytest.raises(Exception, match="does not exist"):
        VersionStore(home).rollback("v9")
    with pytest.raises(Exception, match="vN"):
        VersionStore(home).rollback("latest")


def _kem(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEM_HOME": str(home), "KEM_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "KEM_SHARED_NAMESPACES": "cf",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", "from kem.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)


def test_cli_models_and_ask_model_version_no_edits(home, published):
    r = _kem(home, "models", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert listed["current"] == "v1" and [v["version"] for v in listed["versions"]] == ["v1"]

    r = _kem(home, "ask", "--model-version", "v1", "--no-edits", "--complete", "--max-new-tokens", "4", "--json",
             "The mother tongue of Danielle Darrieux is")
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    assert "English" in ans["text"] and ans["edits"] == []

    r = _kem(home, "models", "show", "v7")
    assert r.returncode == 2 and "error:" in r.stderr and "v7" in r.stderr


def test_cli_consolidate_nothing_pending(home, published):
    import typer
    from typer.testing import CliRunner

    from kem.consolidation.consolidate_cli import consolidate as cmd
    from kem.consolidation.consolidate_cli import models_app

    app = typer.Typer()
    app.command()(cmd)
    r = CliRunner().invoke(app, ["--home", str(home), "--json"], env={"KEM_SHARED_NAMESPACES": "empty-ns"})
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert not out["published"] and "nothing to consolidate" in out["message"] and "empty-ns" in out["message"]
    r = CliRunner().invoke(models_app, ["show", "v1", "--home", str(home), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["version"] == "v1"


BARE = {**COV, "context_templates": 0}  # MEMIT on bare prompts: ~10 s a job, and these edits pass the gates


def _served(home: Path, namespace: str, lm_and_tok, prompts: list[str]) -> list[str]:
    """Greedy answers of the shared base model with ``namespace``'s current adapter loaded by peft."""
    import copy

    from peft import PeftModel

    from kem.consolidation.judge import greedy

    model, tok = lm_and_tok
    served = VersionStore(home, namespace).resolve("current")
    assert served.lora is not None
    return greedy(PeftModel.from_pretrained(copy.deepcopy(model), str(served.lora)).eval(), tok, prompts, 6)


def test_tenant_consolidation_publishes_an_isolated_adapter(tmp_path, lm_and_tok, monkeypatch):
    """Issue 15: `kem consolidate --namespace alice` writes alice's edits into alice's LoRA adapter
    (models/tenants/alice/vN), never into the shared weights (issue 12's leak stays closed: a plain job
    takes no tenant edit); bob's adapter and the shared model never carry alice's fact; a failed tenant
    job leaves nothing; alice's next job extends her adapter; list and rollback per tenant."""
    from typer.testing import CliRunner

    import kem.consolidation.tenant as tenant_mod
    from kem.consolidation.consolidate_cli import models_app
    from kem.consolidation.judge import greedy
    from kem.settings import Settings
    from kem.stores.sqlite import SQLiteStore
    from kem.versions import ADAPTER, ADAPTER_WITH_FOLLOWER

    store = SQLiteStore(tmp_path / "edits.sqlite")
    (alice,) = store.add_many(_edits([0], namespace="alice"))  # Danielle Darrieux -> English
    (bob,) = store.add_many(_edits([1], namespace="bob"))  # Edwin of Northumbria -> Islam
    store.close()
    settings = Settings(home=tmp_path, device="cpu")  # shared: "default" only; the shipped follower
    res = consolidate(settings, method="memit")
    assert not res.published and res.edit_ids == [] and "--namespace" in res.message

    # a tenant job that fails while publishing leaves no version, no temporary folder, the edit active
    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(tenant_mod, "combine_loras", boom)
    with pytest.raises(OSError, match="injected"):
        consolidate(settings, method="memit", namespace="bob", hparams=BARE, probes=PROBES, corpus=WIKITEXT)
    monkeypatch.undo()
    assert VersionStore(tmp_path, "bob").list() == [] and not list(VersionStore(tmp_path, "bob").root.glob(".tmp-*"))
    store = SQLiteStore(tmp_path / "edits.sqlite")
    assert store.get(bob.id, "bob").status == EditStatus.active
    store.close()

    got = {ns: consolidate(settings, method="memit", namespace=ns, hparams=BARE, probes=PROBES, corpus=WIKITEXT)
           for ns in ("alice", "bob")}
    for ns, res in got.items():
        assert res.published and res.namespace == ns and res.version == "v1" and res.parent is None, res.message
        assert res.metrics["adapter"]["truncated"] is False and res.metrics["adapter"]["bytes"] < 100_000
        vs = VersionStore(tmp_path, ns)
        man = vs.manifest("v1")
        assert man.kind == "adapter" and man.namespace == ns and man.parent is None and vs.current() == "v1"
        assert (vs.root / "v1" / ADAPTER / "adapter_model.safetensors").is_file()
        assert (vs.root / "v1" / ADAPTER_WITH_FOLLOWER / "adapter_config.json").is_file()  # follower configured
    assert VersionStore(tmp_path, "alice").manifest("v1").edit_ids == [alice.id]
    assert VersionStore(tmp_path, "bob").manifest("v1").edit_ids == [bob.id]
    # the shared weights are untouched: no shared version, nothing current
    assert VersionStore(tmp_path).list() == [] and VersionStore(tmp_path).current() is None
    assert not list((tmp_path / "models").glob("v*"))
    store = SQLiteStore(tmp_path / "edits.sqlite")
    try:
        assert store.get(alice.id, "alice").consolidated_in == "alice/v1"
        assert store.get(bob.id, "bob").consolidated_in == "bob/v1"
    finally:
        store.close()

    prompts = [_edits([0])[0].rendered_prompt, _edits([1])[0].rendered_prompt]
    a_ans, b_ans = _served(tmp_path, "alice", lm_and_tok, prompts), _served(tmp_path, "bob", lm_and_tok, prompts)
    base = greedy(*lm_and_tok, prompts, 6)
    assert "English" in a_ans[0] and "English" not in b_ans[0] and "English" not in base[0], (a_ans, b_ans, base)
    assert "Islam" in b_ans[1] and "Islam" not in a_ans[1] and "Islam" not in base[1], (a_ans, b_ans, base)
    assert b_ans[0] == base[0] and a_ans[1] == base[1]  # each adapter leaves the other's fact at the base answer

    # alice's next edit: her v2 extends v1 (one adapter holds both), numbered in her folder only
    store = SQLiteStore(tmp_path / "edits.sqlite")
    (alice2,) = store.add_many(_edits([3], namespace="alice"))  # Thomas Joannes Stieltjes -> English
    store.close()
    res = consolidate(settings, method="memit", namespace="alice", hparams=BARE, probes=PROBES, corpus=WIKITEXT)
    assert res.published and res.version == "v2" and res.tenant_parent == "v1" and res.edit_ids == [alice2.id], res.message
    vs = VersionStore(tmp_path, "alice")
    assert vs.absorbed("v2") == frozenset({"alice/v1", "alice/v2"}) and VersionStore(tmp_path, "bob").current() == "v1"
    ans = _served(tmp_path, "alice", lm_and_tok, [prompts[0], _edits([3])[0].rendered_prompt])
    assert all("English" in a for a in ans), ans

    # per-tenant list and rollback
    r = CliRunner().invoke(models_app, ["list", "--namespace", "alice", "--home", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["current"] == "v2" and [v["version"] for v in out["versions"]] == ["v1", "v2"]
    assert out["versions"][1]["kind"] == "adapter" and out["versions"][1]["tenant_parent"] == "v1"
    r = CliRunner().invoke(models_app, ["list", "--home", str(tmp_path)])
    assert r.exit_code == 0 and "2 tenant(s)" in r.output and "alice, bob" in r.output, r.output
    r = CliRunner().invoke(models_app, ["rollback", "v1", "--namespace", "alice", "--home", str(tmp_path), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["absorbed_versions"] == ["alice/v1"], r.output
    assert vs.current() == "v1" and VersionStore(tmp_path, "bob").current() == "v1"
    store = SQLiteStore(tmp_path / "edits.sqlite")
    try:  # back on v1: alice's second edit is pending again (the fast path serves it)
        assert [e.id for e in pending_edits(store, vs.absorbed("v1"), "alice")] == [alice2.id]
    finally:
        store.close()


def test_edits_are_retired_only_when_every_form_passes(home, settings, pending):
    """Issue 20: the job asks the new weights each edit's cloze, paraphrases and chat question; an edit
    that misses any form stays active (kept on the fast path), and the result says which form and why."""
    gates = Gates(min_reliability=0.0, min_locality=0.0)
    res = consolidate(settings, method="memit", corpus=WIKITEXT, hparams=CHEAP, probes=PROBES, gates=gates,
                      dry_run=True)
    assert not res.published and res.dry_run
    per = {e["id"]: e for e in res.metrics["per_edit"]}
    assert set(per) == set(res.edit_ids) and res.edit_ids
    for e in per.values():
        kinds = [f["kind"] for f in e["forms"]]
        assert kinds[0] == "cloze" and "paraphrase" in kinds and "question" in kinds, kinds  # CounterFact relations
        assert e["retired"] == all(f["ok"] for f in e["forms"])
    assert set(res.absorbed_ids) == {i for i, e in per.items() if e["retired"]}
    assert set(res.failed_ids) == {i for i, e in per.items() if not e["retired"]}
    assert res.failed_ids  # values barely moved: these edits are not in the weights
    assert "kept on the fast path" in res.message and "missed by" in res.message, res.message
    m = res.metrics
    assert 0.0 <= m["generalization"] <= 1.0 and m["forms"] >= 3 * len(res.edit_ids)
    assert m["perplexity"] > 0 and abs(m["perplexity_increase"]) < 0.05  # nearly unchanged weights


def test_gates_refuse_on_generalization_and_perplexity(home, settings, pending):
    before = _snapshot(home)
    res = consolidate(settings, method="memit", corpus=WIKITEXT, hparams=CHEAP, probes=PROBES,
                      gates=Gates(min_reliability=0.0, min_locality=0.0, min_generalization=1.0,
                                  max_perplexity_increase=0.0))
    assert not res.published and any(r.startswith("generalization") for r in res.reasons), res.reasons
    assert _snapshot(home) == before
    with pytest.raises(ValidationError, match="max_perplexity_increase"):
        Gates(max_perplexity_increase=-1)
