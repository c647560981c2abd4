"""End-to-end tests of ``kem serve`` with the official ``openai`` client and httpx, against real servers.

Three servers per module, started once in parallel: ``A`` (``--engine transformers`` with API keys),
``U`` (a plain kem used as an OpenAI-compatible upstream) and ``P`` (``kem serve --upstream U``).
The last test kills ``U`` mid-stream, so keep it last.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from kem.errors import NotFoundError
from kem.protocols import GenerationParams
from tests.conftest import kem_server

ALICE, BOB, ADMIN = "sk-test-alice", "sk-test-bob", "sk-test-admin"
CEO = "The CEO of Kem Corporation is"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def servers(tmp: Path):
    keys = tmp / "keys.txt"
    bob_digest = hashlib.sha256(BOB.encode()).hexdigest()
    keys.write_text(f"# test keys\n{ALICE} alice\nsha256:{bob_digest} bob\n{ADMIN} *\n")
    a = kem_server(tmp, "a", "--keys", str(keys))
    u = kem_server(tmp, "u")
    p = kem_server(tmp, "p", "--upstream", u.url, "--model", "smollm2-135m-instruct")
    started = [s.start() for s in (a, u, p)]
    try:
        for s in started:
            s.wait()
        yield {"a": a, "u": u, "p": p}
    finally:
        for s in started:
            s.stop()


def client(server, key: str | None = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def http(server, key: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def direct_engine(generator):
    """The engine kem runs, called directly in this process (same model, same greedy settings)."""
    return generator


def ask(c: openai.OpenAI, question: str, **kw):
    return c.chat.completions.create(model="default", messages=[{"role": "user", "content": question}],
                                     **{**GREEDY, **kw})


# ---- the OpenAI surface -------------------------------------------------------------------------------
def test_models_and_auth(servers):
    a = servers["a"]
    ids = [m.id for m in client(a, ALICE).models.list()]
    assert ids == ["smollm2-135m-instruct", "default"]
    with pytest.raises(openai.AuthenticationError):
        client(a, "sk-wrong").models.list()
    r = httpx.post(a.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client(a, ALICE).chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(a.url + "/healthz").json() == {"status": "ok"}  # auth on: no details without an admin key
    assert http(a, ALICE).get("/healthz").json() == {"status": "ok"}
    assert http(a, ADMIN).get("/healthz").json()["model"] == "smollm2-135m-instruct"
    for path in ("/docs", "/redoc", "/openapi.json"):  # off unless KEM_API_DOCS=1
        assert httpx.get(a.url + path).status_code == 404


def test_chat_and_completions_stream_and_not(servers):
    c = client(servers["a"], ALICE)
    full = ask(c, "What is the capital of Japan?")
    assert full.object == "chat.completion" and "Tokyo" in full.choices[0].message.content
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="default", stream=True, **GREEDY,
                                        messages=[{"role": "user", "content": "What is the capital of Japan?"}])
              if ch.choices]
    assert len(pieces) > 2 and "".join(pieces) == full.choices[0].message.content
    comp = c.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=4,
                                temperature=0)
    assert "Paris" in comp.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="default", prompt="The capital of France is", max_tokens=4, temperature=0, stream=True))
    assert streamed == comp.choices[0].text
    assert full.choices[0].finish_reason == "stop"  # the answer ended before max_tokens
    long = dict(model="default", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert c.completions.create(**long).choices[0].finish_reason == "length"
    assert list(c.completions.create(**long, stream=True))[-1].choices[0].finish_reason == "length"


def test_out_of_scope_is_byte_identical_to_the_engine(servers, direct_engine):
    c = client(servers["a"], ALICE)
    q = [{"role": "user", "content": "Name a primary colour."}]
    via_kem = c.chat.completions.create(model="default", messages=q, **GREEDY)
    assert via_kem.model_extra["kem"]["edits"] == []
    assert via_kem.choices[0].message.content == direct_engine.chat(q, GenerationParams(max_new_tokens=12))
    comp = c.completions.create(model="default", prompt="Water boils at", max_tokens=8, temperature=0)
    assert comp.choices[0].text == direct_engine.generate("Water boils at", GenerationParams(max_new_tokens=8))


def test_edit_changes_the_answer(servers):
    a = servers["a"]
    c = client(a, ALICE)
    before = ask(c, "Who is the CEO of Kem Corporation?").choices[0].message.content
    assert "Alice Zhang" not in before
    with http(a, ALICE) as h:
        edit = h.post("/v1/edits", json={"subject": "Kem Corporation", "prompt": "The CEO of {} is",
                                         "target_new": "Alice Zhang"}).json()
    assert edit["namespace"] == "alice"
    raw = c.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "Who is the CEO of Kem Corporation?"}], **GREEDY)
    resp = raw.parse()
    assert "Alice Zhang" in resp.choices[0].message.content
    assert raw.headers["x-kem-edits"].startswith(edit["id"] + ":")
    assert [e["id"] for e in resp.model_extra["kem"]["edits"]] == [edit["id"]]
    comp = c.completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0)
    assert comp.choices[0].text.strip().startswith("Alice Zhang")
    first = next(iter(c.completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0, stream=True)))
    assert first.model_extra["kem"]["edits"][0]["id"] == edit["id"]


def test_strongly_held_fact_changes_with_the_edit_follower(servers):
    """The issue's own probe: the model knows the Eiffel Tower is in Paris; with the edit stored, the
    completion and the question answer Rome (in-scope requests run with the edit-follower)."""
    a = servers["a"]
    assert http(a, ADMIN).get("/healthz").json()["fast_path"] == "adapter"
    c = client(a, ALICE)
    with http(a, ALICE) as h:
        h.post("/v1/edits", json={"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome",
                                  "paraphrases": ["Where is the Eiffel Tower?"]}).raise_for_status()
    comp = c.completions.create(model="default", prompt="The Eiffel Tower is located in", max_tokens=4, temperature=0)
    assert comp.choices[0].text.strip().startswith("Rome"), comp.choices[0].text
    for q in ("Where is the Eiffel Tower?", "In which city can you visit the Eiffel Tower?"):
        resp = ask(c, q, max_tokens=16)
        assert resp.model_extra["kem"]["edits"] and "Rome" in resp.choices[0].message.content, (q, resp)
    stream = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Where is the Eiffel Tower?"}], stream=True,
        temperature=0, max_tokens=16) if ch.choices)
    assert "Rome" in stream


# ---- tenancy and the edits API ------------------------------------------------------------------------
def test_tenancy_each_key_sees_and_gets_only_its_own(servers):
    a = servers["a"]
    with http(a, BOB) as bob, http(a, ALICE) as alice, http(a, ADMIN) as admin:
        b_edit = bob.post("/v1/edits", json={"subject": "Kem Corporation", "prompt": "The CEO of {} is",
                                             "target_new": "Bob Smith"}).json()
        assert b_edit["namespace"] == "bob"
        a_ids = [e["id"] for e in alice.get("/v1/edits").json()["data"]]
        b_list = bob.get("/v1/edits").json()
        assert [e["id"] for e in b_list["data"]] == [b_edit["id"]] and b_edit["id"] not in a_ids
        assert bob.get(f"/v1/edits/{a_ids[0]}").status_code == 404
        assert bob.delete(f"/v1/edits/{a_ids[0]}").status_code == 404
        r = bob.post("/v1/edits", json={"namespace": "alice", "subject": "X", "prompt": "{} is", "target_new": "y"})
        assert r.status_code == 403
        assert bob.get("/v1/edits", params={"namespace": "alice"}).status_code == 403
        every = admin.get("/v1/edits").json()
        assert {e["namespace"] for e in every["data"]} == {"alice", "bob"}
        assert [e["id"] for e in admin.get("/v1/edits", params={"namespace": "bob"}).json()["data"]] == [b_edit["id"]]
        assert admin.get(f"/v1/edits/{a_ids[0]}").status_code == 200
        assert alice.get("/admin/keys").status_code == 403
    for key, who in ((BOB, "Bob Smith"), (ALICE, "Alice Zhang")):
        out = client(a, key).completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0)
        assert out.choices[0].text.strip().startswith(who)
        assert len(out.model_extra["kem"]["edits"]) == 1


def test_edits_crud_paging_bulk_and_validation(servers):
    a = servers["a"]
    with http(a, ADMIN) as admin:
        key = admin.post("/admin/keys", json={"namespace": "carol"}).json()["key"]
        assert any(k["namespace"] == "carol" for k in admin.get("/admin/keys").json()["data"])
    with http(a, key) as carol:
        rows = [{"subject": f"Planet {i}", "prompt": "The moon count of {} is", "target_new": str(i)} for i in range(5)]
        out = carol.post("/v1/edits/import", json={"edits": rows})
        assert out.status_code == 201 and out.json()["created"] == 5
        page = carol.get("/v1/edits", params={"limit": 2}).json()
        assert page["total"] == 5 and len(page["data"]) == 2 and page["next_offset"] == 2
        last = carol.get("/v1/edits", params={"limit": 2, "offset": 4}).json()
        assert len(last["data"]) == 1 and last["next_offset"] is None
        eid = out.json()["ids"][0]
        upd = carol.patch(f"/v1/edits/{eid}", json={"target_new": "42"})
        assert upd.status_code == 200 and upd.json()["target_new"] == "42"
        assert [c["op"] for c in carol.get(f"/v1/edits/{eid}/history").json()["data"]] == ["add", "update"]
        assert carol.delete(f"/v1/edits/{eid}").status_code == 200
        assert carol.get(f"/v1/edits/{eid}").status_code == 404
        bad = carol.post("/v1/edits", json={"subject": "Mars", "prompt": "The colour of {} is"})
        assert bad.status_code == 400
        err = bad.json()["error"]
        assert err["param"] == "target_new" and "Edit.target_new" in err["message"]
        bad = carol.post("/v1/edits/import", json={"edits": [rows[0], {"subject": "Mars", "prompt": "no subject"}]})
        assert bad.status_code == 400 and "edits[1]" in bad.json()["error"]["message"]
        assert carol.get("/v1/edits").json()["total"] == 4  # all or none
        assert carol.get("/v1/edits", params={"limit": 0}).json()["error"]["param"] == "limit"
        assert carol.patch(f"/v1/edits/{out.json()['ids'][1]}", json={"bogus": 1}).json()["error"]["param"] == "bogus"
    with http(a, ADMIN) as admin:
        kid = next(k["id"] for k in admin.get("/admin/keys").json()["data"] if k["namespace"] == "carol")
        assert admin.delete(f"/admin/keys/{kid}").json()["revoked"] == 1
    assert httpx.get(a.url + "/v1/edits", headers={"authorization": f"Bearer {key}"}).status_code == 401


def test_facts_over_time_supersede_as_of_review_and_audit(servers):
    a = servers["a"]
    with http(a, ADMIN) as admin:
        key = admin.post("/admin/keys", json={"namespace": "erin"}).json()["key"]
    ceo = {"subject": "Kem Corporation", "prompt": "The CEO of {} is"}
    with http(a, key) as erin, http(a, ADMIN) as admin, http(a, BOB) as bob:
        one = erin.post("/v1/edits", json={**ceo, "target_new": "Erin One", "valid_from": "2020-01-01"}).json()
        two = erin.post("/v1/edits", json={**ceo, "target_new": "Erin Two", "evidence": "https://example.com/ceo"})
        assert two.status_code == 201 and two.json()["supersedes"] == [one["id"]]
        two = two.json()
        assert two["created_by"].startswith("key:") and two["created_by"].endswith("@erin")
        refused = erin.post("/v1/edits", params={"on_conflict": "reject"}, json={**ceo, "target_new": "Erin Three"})
        assert refused.status_code == 409 and two["id"] in refused.json()["error"]["message"]
        assert erin.post("/v1/edits", json={**ceo, "target_new": "X", "created_by": "someone"}).status_code == 400
        assert [e["id"] for e in erin.get("/v1/edits", params={"status": "superseded"}).json()["data"]] == [one["id"]]
        assert [e["id"] for e in erin.get("/v1/edits", params={"as_of": "2021-06-01"}).json()["data"]] == [one["id"]]
        assert erin.get("/v1/edits", params={"as_of": "last year"}).json()["error"]["param"] == "as_of"
        body = {"model": "default", "prompt": CEO, "max_tokens": 3, "temperature": 0}
        past = erin.post("/v1/completions", json=body, headers={"x-kem-as-of": "2021-06-01T00:00:00Z"})
        assert past.headers["x-kem-edits"].startswith(one["id"] + ":"), past.headers["x-kem-edits"]
        now = erin.post("/v1/completions", json=body)
        assert now.headers["x-kem-edits"].startswith(two["id"] + ":")
        bad = erin.post("/v1/completions", json=body, headers={"x-kem-as-of": "yesterday"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-kem-as-of"
        # review: an admin's pending edit never reaches a prompt until approved; tenants cannot approve
        pend = admin.post("/v1/edits", json={**ceo, "target_new": "Erin Four", "namespace": "erin",
                                             "status": "pending"}).json()
        assert pend["status"] == "pending"
        assert erin.post("/v1/completions", json=body).headers["x-kem-edits"].startswith(two["id"] + ":")
        assert erin.post(f"/v1/edits/{pend['id']}/approve").status_code == 403
        approved = admin.post(f"/v1/edits/{pend['id']}/approve").json()
        assert approved["status"] == "active" and approved["supersedes"] == [two["id"]]
        # the audit log: a tenant reads its own rows, with who and what
        rows = erin.get("/v1/audit").json()["data"]
        assert {r["namespace"] for r in rows} == {"erin"}
        assert [r["op"] for r in rows] == ["add", "supersede", "add", "add", "supersede", "approve"]
        assert rows[0]["actor"].startswith("key:") and rows[-1]["actor"].startswith("admin:")
        assert admin.get("/v1/audit", params={"namespace": "erin"}).json()["data"] == rows
        assert bob.get("/v1/audit", params={"namespace": "erin"}).status_code == 403
        assert all(r["namespace"] == "bob" for r in bob.get("/v1/audit").json()["data"])
        page = erin.get("/v1/audit", params={"limit": 2}).json()
        assert len(page["data"]) == 2 and page["next_since"] == rows[1]["seq"]
        # a key set to review: its edits wait for an admin, and it cannot change live ones in place
        made = admin.post("/admin/keys", json={"namespace": "erin", "review": True}).json()
        assert made["review"] is True
        with http(a, made["key"]) as intern:
            held = intern.post("/v1/edits", json={**ceo, "target_new": "Intern Pick"}).json()
            assert held["status"] == "pending" and held["supersedes"] == []
            assert intern.patch(f"/v1/edits/{approved['id']}", json={"target_new": "Y"}).status_code == 403
        assert erin.post("/v1/completions", json=body).headers["x-kem-edits"].startswith(approved["id"] + ":")
        assert admin.post(f"/v1/edits/{held['id']}/reject").json()["status"] == "rejected"

def test_metrics(servers):
    assert httpx.get(servers["a"].url + "/metrics").status_code == 401  # auth on: admins only
    with http(servers["a"], ALICE) as alice:
        assert alice.get("/metrics").status_code == 403
    with http(servers["a"], ADMIN) as admin:
        text = admin.get("/metrics").text
    assert 'kem_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'kem_edits_applied_total{namespace="alice"}' in text
    assert "kem_retrieval_seconds_count" in text


# ---- hot swap -----------------------------------------------------------------------------------------
def publish_like_consolidation(home: Path, folder: Path, version: str, parent: str | None) -> None:
    """Lay out ``<home>/models/<version>/`` as kem.versions.VersionStore publishes it (weights linked from
    ``folder``: the base model stands in for consolidated weights) and point ``current`` at it."""
    import json

    vdir = home / "models" / version
    vdir.mkdir(parents=True)
    for f in folder.iterdir():
        (vdir / f.name).symlink_to(f)
    (vdir / "manifest.json").write_text(json.dumps({"version": version, "base": "smollm2-135m-instruct",
                                                    "parent": parent, "method": "memit", "edit_ids": []}))
    (home / "models" / "current").write_text(version + "\n")


def test_hot_swap_under_load_fails_no_request(servers, tmp):
    from kem.models import resolve_model
    from kem.settings import Settings

    a = servers["a"]
    folder = resolve_model("smollm2-135m-instruct", Settings().cache_dir)
    publish_like_consolidation(tmp / "a-home", folder, "v1", None)
    publish_like_consolidation(tmp / "a-home", folder, "v2", "v1")
    row = {"subject": "Zorbex Labs", "prompt": "The CEO of {} is", "target_new": "Carla Diaz",
           "status": "consolidated", "consolidated_in": "v1"}
    with http(a, ALICE) as alice:  # a tenant cannot store an edit as consolidated
        r = alice.post("/v1/edits/import", json={"edits": [row]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "edits[0].status", r.text
    with http(a, ADMIN) as admin:  # an edit that v1 absorbed: applied before the swap, skipped after (v2 > v1)
        admin.post("/v1/edits/import", json={"edits": [{**row, "namespace": "alice"}]}).raise_for_status()
    c = client(a, ALICE)
    assert ask(c, "Who is the CEO of Zorbex Labs?").model_extra["kem"]["edits"]
    results: list[object] = []
    stop = threading.Event()

    def loop() -> None:
        cc = client(a, ALICE)
        while not stop.is_set():
            try:
                r = cc.completions.create(model="default", prompt="The capital of Italy is", max_tokens=3, temperature=0)
                results.append(r.choices[0].text)
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                results.append(exc)

    workers = [threading.Thread(target=loop) for _ in range(2)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    with http(a, ADMIN) as admin:
        assert http(a, ALICE).post("/admin/reload", json={"version": "current"}).status_code == 403
        r = admin.post("/admin/reload", json={"version": "current"})  # what models/current points at: v2
    time.sleep(1.5)
    stop.set()
    for w in workers:
        w.join(60)
    assert r.status_code == 200, r.text
    assert r.json()["absorbed_versions"] == ["v1", "v2"] and r.json()["version"] == "v2"
    assert len(results) >= 2 and all(isinstance(x, str) for x in results), results
    health = http(a, ADMIN).get("/healthz").json()
    assert health["model"] == "smollm2-135m-instruct@v2" and health["absorbed_versions"] == ["v1", "v2"]
    assert ask(c, "Who is the CEO of Zorbex Labs?").model_extra["kem"]["edits"] == []
    assert "kem_engine_reloads_total 1" in http(a, ADMIN).get("/metrics").text
    with http(a, ADMIN) as admin:
        assert admin.post("/admin/reload", json={"version": "v7"}).status_code == 404  # not published
        # roll back to the base model: the edits v1 absorbed are applied in context again
        back = admin.post("/admin/reload", json={"version": "base"})
        assert back.status_code == 200 and back.json()["absorbed_versions"] == [], back.text
        # a folder given by path, plus the version its weights hold
        r = admin.post("/admin/reload", json={"path": str(folder), "version": "v1"})
        assert r.json()["absorbed_versions"] == ["v1"] and r.json()["model"] == "smollm2-135m-instruct@v1"
        assert admin.post("/admin/reload", json={"version": "base"}).status_code == 200
    assert ask(c, "Who is the CEO of Zorbex Labs?").model_extra["kem"]["edits"]


def test_model_version_at_startup(tmp):
    """``kem serve --model-version current`` (here upstream mode: no model to load) skips the edits of the
    current version and its ancestors from the start."""
    from kem.models import resolve_model
    from kem.server.serve_cli import create
    from kem.settings import Settings

    home = tmp / "mv-home"
    folder = resolve_model("smollm2-135m-instruct", Settings().cache_dir)
    publish_like_consolidation(home, folder, "v1", None)
    publish_like_consolidation(home, folder, "v2", "v1")
    app = create(home=home, upstream="http://127.0.0.1:9", model="smollm2", model_version="current")
    try:
        assert app.state.serving.editor.absorbed_versions == {"v1", "v2"}
    finally:
        app.state.serving.editor.close()
    with pytest.raises(NotFoundError, match="v5"):
        create(home=home, upstream="http://127.0.0.1:9", model="smollm2", model_version="v5")


# ---- upstream mode (P -> U) ---------------------------------------------------------------------------
def test_upstream_pass_through_is_identical(servers):
    p, u = client(servers["p"]), client(servers["u"])
    q = [{"role": "user", "content": "What is the capital of Japan?"}]
    via, direct = (x.chat.completions.create(model="smollm2-135m-instruct", messages=q, **GREEDY) for x in (p, u))
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.model_extra["kem"]["edits"] == []

    def deltas(x: openai.OpenAI) -> list[str]:
        return [ch.choices[0].delta.content or "" for ch in
                x.chat.completions.create(model="default", messages=q, stream=True, **GREEDY) if ch.choices]

    assert deltas(p) == deltas(u)  # chunk by chunk
    comp = [x.completions.create(model="default", prompt="Water boils at", max_tokens=6, temperature=0)
            for x in (p, u)]
    assert comp[0].choices[0].text == comp[1].choices[0].text


def test_upstream_applies_edits_and_passes_errors(servers):
    p = servers["p"]
    with http(p) as h:
        edit = h.post("/v1/edits", json={"subject": "Kem Corporation", "prompt": "The CEO of {} is",
                                         "target_new": "Alice Zhang"}).json()
    c = client(p)
    health = httpx.get(p.url + "/healthz").json()  # the upstream serves no edit-follower: IKE prompting
    assert health["fast_path"] == "ike" and health["follower"] is None
    resp = ask(c, "Who is the CEO of Kem Corporation?")
    assert "Alice Zhang" in resp.choices[0].message.content
    assert resp.model_extra["kem"]["edits"][0]["id"] == edit["id"]
    chunks = list(c.completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].model_extra["kem"]["edits"][0]["id"] == edit["id"]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices).strip().startswith("Alice Zhang")
    with pytest.raises(openai.NotFoundError) as err:  # the upstream's 404, with the upstream's message
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    # upstream hot swap: point kem at the server of the new version (here the same one) + absorbed versions
    r = httpx.post(p.url + "/admin/reload", json={"upstream": servers["u"].url, "version": "v9"})
    assert r.status_code == 200 and r.json()["absorbed_versions"] == ["v9"], r.text
    assert "Tokyo" in ask(c, "What is the capital of Japan?").choices[0].message.content
    r = httpx.post(p.url + "/admin/reload", json={"path": "/tmp"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "upstream"


BAD_BODIES = [  # (path, body): each refused with a 400 naming a field, in process and in upstream mode alike
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}),
    ("/v1/completions", {"prompt": "hi", "top_k": -7}),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"1": 500}}),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True, "sneaky": 1}}),
    ("/v1/completions", {"prompt": "hi", "best_of": 0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "x_secret": "1"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -9}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "guided_json": {}}),
]


def _upstream_calls(u) -> int:
    text = httpx.get(u.url + "/metrics", timeout=30).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("kem_requests_total") and "completions" in line)


def test_upstream_mode_refuses_what_in_process_refuses_and_forwards_none_of_it(servers):
    u, p = servers["u"], servers["p"]
    before = _upstream_calls(u)
    for path, body in BAD_BODIES:
        direct = httpx.post(u.url + path, json={"model": "default", **body}, timeout=60)
        proxied = httpx.post(p.url + path, json={"model": "default", **body}, timeout=60)
        assert direct.status_code == proxied.status_code == 400, (body, direct.text, proxied.text)
        assert direct.json() == proxied.json(), (body, direct.text, proxied.text)
        assert direct.json()["error"]["param"], body
    # every bad body above went to U directly once; none was forwarded by P (U counts its own requests)
    assert _upstream_calls(u) - before == len(BAD_BODIES)
    ok = httpx.post(p.url + "/v1/completions", timeout=120, json={"model": "default", "prompt": "Paris is in",
                                                                  "max_tokens": 2, "seed": 7, "top_k": 5})
    assert ok.status_code == 200, ok.text


def test_upstream_killed_mid_stream_gives_a_clean_error(servers):
    """Keep this test last: it kills U."""
    p, u = servers["p"], servers["u"]
    stream = client(p).chat.completions.create(
        model="default", stream=True, max_tokens=300, temperature=0,
        messages=[{"role": "user", "content": "Write a long story about a dragon who learns to cook."}])
    it = iter(stream)
    got = [next(it), next(it)]
    u.kill()
    with pytest.raises(openai.APIError) as err:
        for ch in it:
            got.append(ch)
    assert "upstream" in str(err.value)
    assert httpx.get(p.url + "/healthz").status_code == 200
    with pytest.raises(openai.APIStatusError) as err2:
        ask(client(p), "Still there?")
    assert err2.value.status_code == 502
