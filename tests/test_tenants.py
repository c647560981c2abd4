"""Per-tenant adapters: each namespace's consolidated version (a LoRA under
``models/tenants/<ns>/``) serves that namespace only, on the transformers engine in-process and through
``kem serve`` with two API keys bound to two namespaces (the vLLM engines: tests/test_vllm.py)."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import openai
import pytest

from kem.edit import Edit
from kem.errors import ValidationError
from kem.protocols import LoraRef
from kem.versions import VersionStore
from tests.conftest import kem_server
from tests.fact_adapters import fact_adapter, publish_tenant
from tests.generator_conformance import TENANT_FACTS

MOTHER = "The mother tongue of Danielle Darrieux is"  # base: French; alice: English; bob: Italian


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


def test_lora_hooks_follow_peft_rank_and_alpha_patterns(lm_and_tok, tmp_path: Path) -> None:
    """LoraHooks (what the transformers engine switches per request) computes what peft does, with
    per-module ranks and alphas."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kem.follower.lora import LoraHooks

    model, tok = lm_and_tok
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "o_proj"], layers_to_transform=[3, 20],
                     rank_pattern={"model.layers.20.mlp.down_proj": 2}, alpha_pattern={"o_proj": 3})
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path)
    ids = tok(MOTHER, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = peft_model(input_ids=ids).logits
        hooks = LoraHooks(model, tmp_path)
        assert sorted(hooks.modules[i][1].shape[0] for i in range(len(hooks.modules))) == [2, 4, 4, 4]
        base = model(input_ids=ids).logits
        with hooks.active():
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 and (got - base).abs().max() > 1e-2
    assert torch.equal(after, base)


def test_resident_adapters_are_a_bounded_lru(lm_and_tok, tenant_adapters) -> None:
    from kem.follower.lora import ResidentAdapters

    model, _ = lm_and_tok
    lru = ResidentAdapters(model, capacity=1)
    a, b = tenant_adapters["alice"], tenant_adapters["bob"]
    first = lru.get(a.name, a.path)
    assert lru.get(a.name, a.path) is first and lru.loads == 1
    lru.get(b.name, b.path)
    assert len(lru) == 1 and lru.evictions == 1
    assert lru.get(a.name, a.path) is not first and lru.loads == 3  # evicted, loaded again
    with pytest.raises(ValidationError, match="max_adapters"):
        ResidentAdapters(model, capacity=0)
    with pytest.raises(ValidationError, match="adapter"):
        LoraRef("", a.path)


@pytest.fixture
def editor(tmp_path: Path, generator, embedder, kem_settings):
    from kem.editor import KnowledgeEditor

    settings = kem_settings.model_copy(update={"home": tmp_path})
    ke = KnowledgeEditor.in_memory(settings=settings, generator=generator, embedder=embedder)
    yield ke
    ke.close()


def test_a_namespace_runs_with_its_own_adapter_and_skips_only_its_absorbed_edits(editor, tenant_adapters,
                                                                                  tmp_path: Path) -> None:
    publish_tenant(tmp_path, "alice", tenant_adapters["alice"].path)
    tv = editor.tenant_of("alice")
    assert tv is not None and tv.lora.name == "alice/v1" and editor.tenant_of("bob") is None
    assert editor.generate(MOTHER, "alice", max_new_tokens=3).text.strip().startswith("English")
    assert editor.generate(MOTHER, "bob", max_new_tokens=3).text.strip().startswith("French")  # no version: base
    # issue 20: alice's weights alone (no fast path) are the shared weights plus her adapter, and say so
    alone = editor.generate(MOTHER, "alice", max_new_tokens=3, use_edits=False)
    assert alone.text.strip().startswith("English") and alone.model == f"{editor.generator.name}+alice/v1"
    bob_alone = editor.generate(MOTHER, "bob", max_new_tokens=3, use_edits=False)
    assert bob_alone.text.strip().startswith("French") and bob_alone.model == editor.generator.name
    assert editor.generate(MOTHER, "default", max_new_tokens=3).text.strip().startswith("French")

    # an edit the tenant's adapter absorbed is skipped for that tenant only; pending edits still apply
    absorbed = sorted(tv.absorbed)[0]
    fact = {"subject": "Kem Corporation", "prompt": "The CEO of {} is", "target_new": "Alice Zhang"}
    gone = editor.add(Edit(namespace="alice", **fact))
    editor.store.mark_consolidated([gone.id], absorbed)
    pending = editor.add(Edit(namespace="alice", subject="Kem Tower", prompt="{} is located in", target_new="Oslo"))
    same_name = editor.add(Edit(namespace="bob", **fact))  # a version of the same name, in bob's namespace
    editor.store.mark_consolidated([same_name.id], absorbed)
    ceo = "The CEO of Kem Corporation is"
    assert [s.edit.id for s in editor.rewrite_prompt(ceo, "alice").applied] == []
    assert [s.edit.id for s in editor.rewrite_prompt(ceo, "bob").applied] == [same_name.id]
    rw = editor.rewrite_prompt("Kem Tower is located in", "alice")
    assert [s.edit.id for s in rw.applied] == [pending.id] and rw.lora == tv.lora  # IKE + the adapter
    # the shared behaviour is unchanged: served versions skip their edits in every namespace
    editor.serve_version({absorbed})
    assert editor.rewrite_prompt(ceo, "bob").applied == []
    editor.serve_version(set())

    # the edit-follower: in-scope requests need the combined adapter, else they are composed as IKE
    both = tmp_path / "models" / "tenants" / "alice" / "v1" / "adapter_with_follower"
    shutil.copytree(tv.lora.path, both)
    editor.tenants.clear()
    tv2 = editor.tenant_of("alice")
    assert tv2 is not None and tv2.with_follower is not None
    rw = editor.rewrite_prompt("Kem Tower is located in", "alice", follower="kem-editor")
    assert rw.lora == tv2.with_follower and rw.lora.name == "alice/v1+follower"
    assert editor.rewrite_prompt(MOTHER, "alice", follower="kem-editor").lora == tv2.lora  # out of scope

    # a newly published version is picked up by the next request (the pointer's mtime), rollback too
    time.sleep(0.01)
    assert publish_tenant(tmp_path, "alice", tenant_adapters["bob"].path) == "v2"
    assert editor.tenant_of("alice").version == "v2"  # type: ignore[union-attr]
    assert editor.generate(MOTHER, "alice", max_new_tokens=3).text.strip().startswith("Italian")
    VersionStore(tmp_path, namespace="alice").rollback("base")
    assert editor.tenant_of("alice") is None
    VersionStore(tmp_path, namespace="alice").rollback("v1")
    assert editor.tenant_of("alice").version == "v1"  # type: ignore[union-attr]
    # an adapter computed on other shared weights than those served is not applied
    editor.serve_version({"v1"})
    assert editor.tenant_of("alice") is None
    assert editor.generate(MOTHER, "alice", max_new_tokens=3).text.strip().startswith("French")
    editor.serve_version(set())


@pytest.fixture(scope="module")
def tenant_server(tmp_path_factory: pytest.TempPathFactory, tenant_adapters):
    tmp = tmp_path_factory.mktemp("tenants")
    home = tmp / "tenants-home"
    for tenant in TENANT_FACTS:
        publish_tenant(home, tenant, tenant_adapters[tenant].path)
    keys = tmp / "keys.txt"
    keys.write_text("sk-alice alice\nsk-bob bob\nsk-root *\n")
    server = kem_server(tmp, "tenants", "--keys", str(keys), env={"KEM_TEST_THREADS": "1"}).start()
    try:
        yield server.wait(), home
    finally:
        server.stop()


def test_http_two_keys_two_tenants(tenant_server, lm_and_tok, tmp_path: Path) -> None:
    """Through ``kem serve`` and the openai client: alice's key gets alice's adapter, bob's key bob's,
    an admin the base model; alice's facts never reach bob; a new version of alice's is served without
    a restart."""
    server, home = tenant_server

    def ask(key: str, prompt: str = MOTHER, stream: bool = False) -> str:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)
        if stream:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model="default", prompt=prompt, max_tokens=3, temperature=0, stream=True) if ch.choices)
        return c.completions.create(model="default", prompt=prompt, max_tokens=3, temperature=0).choices[0].text

    assert ask("sk-alice").strip().startswith("English")
    assert ask("sk-bob").strip().startswith("Italian")
    assert ask("sk-root").strip().startswith("French")
    assert ask("sk-bob", stream=True).strip().startswith("Italian")
    for tenant, other in (("alice", "bob"), ("bob", "alice")):  # every fact of one, asked by the other
        for prompt, target in TENANT_FACTS[tenant]:
            assert ask(f"sk-{tenant}", prompt).strip().startswith(target)
            if (prompt, target) not in TENANT_FACTS[other]:
                assert not ask(f"sk-{other}", prompt).strip().startswith(target), (other, prompt)

    model, tok = lm_and_tok
    fact_adapter(model, tok, [(MOTHER, "German")], tmp_path / "alice-v2")
    time.sleep(0.01)
    assert publish_tenant(home, "alice", tmp_path / "alice-v2") == "v2"
    assert ask("sk-alice").strip().startswith("German")  # no restart, no reload call
    assert ask("sk-bob").strip().startswith("Italian")


def test_personal_assistant_tenants_example() -> None:
    """examples/personal_assistant_tenants.py as a user runs it (real ``kem consolidate --namespace
    <user> --method rome`` per user, ~30 s): two users' consolidated facts differ, one engine, the openai
    client; the facts leave the prompt and come from each user's adapter."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pat", Path(__file__).parent.parent / "examples" /
                                                  "personal_assistant_tenants.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main([])
    for phase in ("before", "after"):
        assert out[phase]["alice"][0].strip().startswith("Priya Raman"), out
        assert out[phase]["bob"][0].strip().startswith("Tomás Silva"), out
        assert "Raman" not in out[phase]["carol"][0] and "Silva" not in out[phase]["carol"][0], out
    assert out["before"]["alice"][1] == ["Priya Raman"] and out["before"]["bob"][1] == ["Tomás Silva"]
    assert all(applied == [] for _, applied in out["after"].values()), out  # from the adapters alone
