"""The operator console (``/console``, :mod:`kem.server.console`) over HTTP, in process: the real app
on the real SmolLM2, SQLite store and FAISS index, fetched with bearer keys as scripts would, and with
the login cookie as a browser would (CSRF, escaping, tenants). tests/test_console_browser.py drives the
same pages in a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kem.editor import KnowledgeEditor
from kem.server.app import build_app
from kem.server.auth import KeyRing

KEYS = {"admin": "sk-console-admin", "alice": "sk-console-alice", "bob": "sk-console-bob"}
CEO = {"subject": "Kem Corporation", "prompt": "The CEO of {} is", "target_new": "Alice Zhang"}
XSS = "<script>alert('kem')</script>"


def keyed_app(tmp: Path, keys: dict[str, str], generator, embedder, kem_settings):
    """The real app over a SQLite home under ``tmp``, with ``keys`` (``admin``: an admin key, every
    other name: a tenant key of that namespace). Returns ``(app, settings, editor)``."""
    path = tmp / "keys"
    path.write_text("".join(f"{key} {'*' if who == 'admin' else who}\n" for who, key in keys.items()))
    path.chmod(0o600)
    settings = kem_settings.model_copy(update={"home": tmp / "home"})
    editor = KnowledgeEditor.open(settings=settings, generator=generator, embedder=embedder)
    return build_app(settings, editor, generator, keys=KeyRing(path)), settings, editor


@pytest.fixture(scope="module")
def app_parts(tmp_path_factory, generator, embedder, kem_settings):
    app, settings, editor = keyed_app(tmp_path_factory.mktemp("console"), KEYS, generator, embedder, kem_settings)
    yield app, settings
    editor.close()


@pytest.fixture(scope="module")
def app(app_parts):
    return app_parts[0]


def client(app, who: str | None = None) -> TestClient:
    c = TestClient(app, follow_redirects=False)
    if who:
        c.headers["authorization"] = f"Bearer {KEYS[who]}"
    return c


def browser(app, who: str) -> TestClient:
    """A client logged in through the form (the key in the cookie, as a browser holds it)."""
    c = TestClient(app, follow_redirects=False)
    r = c.post("/console/login", data={"key": KEYS[who], "next": "/console/edits"})
    assert r.status_code == 303 and r.headers["location"] == "/console/edits"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    return c


def csrf(c: TestClient, path: str = "/console/edits") -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', c.get(path).text)
    assert m, "no CSRF token on the page"
    return m.group(1)


def add(app, who: str, **fields) -> dict:
    r = client(app, who).post("/v1/edits", json={**CEO, **fields})
    assert r.status_code == 201, r.text
    return r.json()


def test_login_cookie_csrf_and_security_headers(app):
    anon = client(app)
    r = anon.get("/console/edits")
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next=")
    r = anon.post("/console/login", data={"key": "sk-wrong", "next": "/console/edits"})
    assert r.status_code == 401 and "not valid" in r.text
    r = anon.post("/console/login", data={"key": KEYS["alice"], "next": "https://evil.example/"})
    assert r.headers["location"] == "/console/edits"  # no open redirect
    alice = browser(app, "alice")
    page = alice.get("/console/edits")
    assert page.status_code == 200 and "namespace alice" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    # a form posted with the cookie but without the right token is refused and stores nothing
    before = client(app, "alice").get("/v1/edits").json()["total"]
    r = alice.post("/console/edits", data={**CEO, "csrf": "0" * 64})
    assert r.status_code == 403 and "CSRF" in r.text
    assert client(app, "alice").get("/v1/edits").json()["total"] == before
    # bob's token does not work with alice's cookie
    bob_token = csrf(browser(app, "bob"))
    assert alice.post("/console/edits", data={**CEO, "csrf": bob_token}).status_code == 403
    r = alice.post("/console/edits", data={**CEO, "csrf": csrf(alice)})
    assert r.status_code == 303 and r.headers["location"].startswith("/console/edits/")
    assert client(app, "alice").get("/v1/edits").json()["total"] == before + 1
    r = alice.post("/console/logout", data={"csrf": csrf(alice)})
    assert r.status_code == 303 and 'kem_console=""' in r.headers["set-cookie"]


def test_edit_text_is_escaped_everywhere(app):
    e = add(app, "alice", subject=f"Acme {XSS}", target_new=f'"><img src=x onerror=alert(1)> {XSS}',
            paraphrases=[f"Who runs Acme {XSS}?"])
    admin = client(app, "admin")
    for path in (f"/console/edits/{e['id']}?namespace=alice", "/console/edits?namespace=alice",
                 f"/console/edits?q={XSS[:8]}&namespace=alice"):
        html = admin.get(path).text
        assert XSS not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;alert(" in html, path


def test_search_full_text_and_nearest_with_filters(app):
    made = [add(app, "bob", subject=f"Widget {i}", prompt="The maker of {} is", target_new=f"Maker {i}")
            for i in range(30)]
    bob = client(app, "bob")
    r = bob.get("/console/edits", params={"q": "widget 2"})
    rows = re.findall(r'data-edit-id="([0-9a-f]+)"', r.text)
    assert set(rows) == {made[2]["id"], *(m["id"] for m in made[20:30])}
    r = bob.get("/console/edits", params={"subject": "WIDGET 7"})
    assert re.findall(r'data-edit-id="([0-9a-f]+)"', r.text) == [made[7]["id"]]
    # pagination on the server: 25 per page, then the rest
    first = re.findall(r'data-edit-id="([0-9a-f]+)"', bob.get("/console/edits", params={"q": "widget"}).text)
    second = re.findall(r'data-edit-id="([0-9a-f]+)"',
                        bob.get("/console/edits", params={"q": "widget", "offset": 25}).text)
    assert len(first) == 25 and len(second) == 5 and not set(first) & set(second)
    r = bob.get("/console/edits", params={"q": "Who makes Widget 12?", "mode": "nearest"})
    near = re.findall(r'data-edit-id="([0-9a-f]+)"', r.text)
    assert near[0] == made[12]["id"]
    # the API's list takes the same filters
    api = bob.get("/v1/edits", params={"q": "widget 2", "limit": 5}).json()
    assert api["total"] == 11 and len(api["data"]) == 5
    assert bob.get("/v1/edits/search", params={"q": "Who makes Widget 12?", "k": 3}).json()["data"][0]["id"] == made[12]["id"]


def test_tenant_sees_only_its_namespace_and_foreign_ids_look_missing(app):
    mine = add(app, "alice", subject="Alice Only Corp")
    theirs = add(app, "bob", subject="Bob Only Corp")
    alice = client(app, "alice")
    listing = alice.get("/console/edits").text
    assert "Alice Only Corp" in listing and "Bob Only Corp" not in listing
    assert "Bob Only Corp" not in alice.get("/console/edits", params={"q": "Only Corp"}).text
    assert "Bob Only Corp" not in alice.get("/console/edits", params={"q": "Only Corp", "mode": "nearest"}).text
    foreign = alice.get(f"/console/edits/{theirs['id']}")
    missing = alice.get("/console/edits/0123456789abcdef0123456789abcdef")
    assert foreign.status_code == missing.status_code == 404
    norm = lambda r: r.text.replace(theirs["id"], "ID").replace("0123456789abcdef0123456789abcdef", "ID")  # noqa: E731
    assert norm(foreign) == norm(missing) and "Bob Only" not in foreign.text
    # asking for bob's namespace by name is refused, and changing bob's edit is a 404 that changes nothing
    assert alice.get("/console/edits", params={"namespace": "bob"}).status_code == 403
    r = alice.post(f"/console/edits/{theirs['id']}", data={"action": "delete"})
    assert r.status_code == 404
    assert client(app, "bob").get(f"/v1/edits/{theirs['id']}").status_code == 200
    assert alice.get(f"/console/edits/{mine['id']}").status_code == 200
    audit = alice.get("/console/audit").text
    assert "Alice Only Corp" in audit and "Bob Only Corp" not in audit and theirs["id"][:10] not in audit
    assert "Bob Only Corp" in client(app, "admin").get("/console/audit", params={"namespace": "bob"}).text
    # evaluation runs and other versions are for admins
    assert alice.get("/console/eval/anything").status_code == 404
    assert alice.get("/console/versions/shared/v1").status_code == 404


def test_change_supersede_retire_delete_and_history(app):
    e = add(app, "alice", subject="Globex", target_new="Hank Scorpio")
    alice = browser(app, "alice")
    token = csrf(alice)
    r = alice.post(f"/console/edits/{e['id']}", data={"csrf": token, "action": "save", "subject": "Globex",
                                                      "prompt": "The CEO of {} is", "target_new": "Hank Scorpio",
                                                      "evidence": "https://example.com/globex", "paraphrases": ""})
    assert r.status_code == 303 and "evidence" in r.headers["location"]
    r = alice.post(f"/console/edits/{e['id']}", data={"csrf": token, "action": "supersede", "new_target": "Mindy"})
    new_id = r.headers["location"].split("/console/edits/")[1].split("?")[0]
    old = client(app, "alice").get(f"/v1/edits/{e['id']}").json()
    assert old["status"] == "superseded" and old["superseded_by"] == new_id
    page = alice.get(f"/console/edits/{e['id']}").text
    assert page.count("<tr><td>") >= 3 and "key:" in page  # history rows with who made them
    now_list = alice.get("/console/edits", params={"q": "Globex"}).text
    then_list = alice.get("/console/edits", params={"q": "Globex", "as_of": "2000-01-01"}).text
    assert "Mindy" in now_list and "Mindy" not in then_list  # nothing of Globex applied then
    r = alice.post(f"/console/edits/{new_id}", data={"csrf": token, "action": "retire"})
    assert client(app, "alice").get(f"/v1/edits/{new_id}").json()["status"] == "retired"
    r = alice.post(f"/console/edits/{new_id}", data={"csrf": token, "action": "delete"})
    assert r.status_code == 303 and client(app, "alice").get(f"/v1/edits/{new_id}").status_code == 404
    # bad input: a clear error naming the field, nothing stored
    r = alice.post("/console/edits", data={"csrf": token, "subject": "X", "prompt": "no placeholder", "target_new": "Y"})
    assert r.status_code == 400 and "prompt" in r.text


def test_import_shows_the_records_it_skipped(app):
    rows = [json.dumps({"subject": "Initech", "prompt": "The CEO of {} is", "target_new": "Bill Lumbergh"}),
            json.dumps({"subject": "Initrode", "prompt": "no placeholder here", "target_new": "Someone"}),
            "{not json",
            json.dumps({"subject": "Intertrode", "prompt": "The CEO of {} is", "target_new": "Peter Gibbons"})]
    alice = client(app, "alice")
    r = alice.post("/console/edits/import", files={"file": ("edits.jsonl", "\n".join(rows).encode())})
    assert r.status_code == 200, r.text
    assert re.search(r"2 edits added.*2 records skipped", r.text)
    assert r.text.count('class="skipped"') == 2 and "prompt" in r.text
    assert alice.get("/v1/edits", params={"q": "Initech"}).json()["total"] == 1


def test_playground_answers_unedited_and_with_kem(app):
    add(app, "alice", subject="Kem Corporation", target_new="Zora Quill")
    alice = client(app, "alice")
    r = alice.post("/console/playground", data={"kind": "completion", "text": "The CEO of Kem Corporation is"})
    assert r.status_code == 200, r.text
    answers = re.findall(r'<p class="text">(.*?)</p>', r.text, re.S)
    assert len(answers) == 2 and "Zora Quill" not in answers[0] and "Zora Quill" in answers[1]
    assert "Edits applied" in r.text and "The request the engine saw" not in r.text  # admins only
    assert re.search(r'<a href="/console/edits/[0-9a-f]{32}">Kem Corporation</a>: Zora Quill', r.text)
    admin = client(app, "admin").post("/console/playground", data={"kind": "completion", "namespace": "alice",
                                                                    "text": "The CEO of Kem Corporation is"})
    assert "The request the engine saw" in admin.text and "Zora Quill" in admin.text
    # the same bypass is in the API: x-kem-no-edits
    body = {"model": "default", "prompt": "The CEO of Kem Corporation is", "max_tokens": 8}
    plain = alice.post("/v1/completions", json=body, headers={"x-kem-no-edits": "1"})
    assert plain.status_code == 200 and plain.headers["x-kem-edits"] == "" and "Zora" not in plain.json()["choices"][0]["text"]
    assert alice.post("/v1/completions", json=body, headers={"x-kem-no-edits": "maybe"}).status_code == 400


def test_health_eval_versions_pages(app, app_parts, tmp_path):
    settings = app_parts[1]
    admin = client(app, "admin")
    h = admin.get("/console/health")
    assert h.status_code == 200 and "index revision" in h.text and h.text.count("<code>") >= 3
    alice = client(app, "alice").get("/console/health")
    assert "index revision" not in alice.text and alice.text.count("<code>") == 1  # her own key only
    run = Path(settings.home) / "eval" / "20261206-ike-counterfact"
    run.mkdir(parents=True)
    probes = [{"kind": "reliability", "prompt": "The CEO of X is", "expected": "Y", "generated": " Z", "contains": False},
              {"kind": "locality", "prompt": "Paris is in", "generated": " Spain", "pre_generated": " France",
               "unchanged": False}, {"kind": "generalization", "prompt": "p", "expected": "Y", "generated": "Y",
                                     "contains": True}]
    (run / "results.json").write_text(json.dumps({
        "config": {"dataset": "counterfact", "n": 1, "mode": "batch", "methods": ["ike"], "model": "m"},
        "summary": {"ike": {"generation.reliability": 0.0, "generation.generalization": 1.0, "generation.locality": 0.0}},
        "cases": {"ike": [{"case_id": "counterfact:0", "probes": probes}]}}))
    assert "20261206-ike-counterfact" in admin.get("/console/eval").text
    page = admin.get("/console/eval/20261206-ike-counterfact").text
    assert "Misses per case (2)" in page and " Spain" in page and " France" in page
    assert admin.get("/console/eval/..%2F..%2Fetc").status_code == 404
    assert "Nothing published yet" in admin.get("/console/versions").text


def test_dry_run_from_the_versions_page_runs_the_real_job_and_publishes_nothing(app, app_parts):
    """A consolidation dry run started in the console: ``kem consolidate --dry-run`` in its own process on
    this store (FT-L: the quickest method), watched on its job page; nothing is published or retired."""
    import time

    settings = app_parts[1]
    admin = browser(app, "admin")
    add(app, "admin", subject="Quux Ltd", target_new="Ada Byron")
    r = admin.post("/console/versions/dry-run", data={"csrf": csrf(admin, "/console/versions"), "method": "ft-l",
                                                      "namespace": "default"})
    assert r.status_code == 303 and r.headers["location"].startswith("/console/jobs/")
    job = r.headers["location"]
    assert "data-refresh" in admin.get(job).text  # the page refreshes itself while the job runs
    again = admin.post("/console/versions/dry-run", data={"csrf": csrf(admin, "/console/versions"), "method": "ft-l"})
    assert again.status_code == 400 and "already running" in again.text
    assert client(app, "alice").get(job).status_code == 404  # a tenant does not see an admin's job
    deadline = time.monotonic() + 600
    while "running" in (page := admin.get(job).text) and time.monotonic() < deadline:
        time.sleep(2)
    state = re.search(r'data-testid="job-state">([^<]+)<', page).group(1)
    assert state in ("done", "refused by its gates"), page[-3000:]
    log = re.search(r'data-testid="job-log">(.*?)</pre>', page, re.S).group(1)
    assert "probes (edited)" in log and ("dry run" in log or "nothing published" in log), log  # the job's own report
    assert not (Path(settings.home) / "models" / "v1").exists()
    assert client(app, "admin").get("/v1/edits", params={"status": "consolidated"}).json()["total"] == 0
    assert job.rsplit("/", 1)[1] in admin.get("/console/versions").text


def test_the_console_can_be_turned_off(app_parts):
    app, settings = app_parts
    off = build_app(settings.model_copy(update={"console": False}), app.state.serving.editor,
                    app.state.serving.engine, keys=app.state.keys)
    c = TestClient(off, follow_redirects=False)
    for path in ("/console", "/console/edits", "/console/login", "/console/static/console.js"):
        assert c.get(path).status_code == 404, path
    assert c.get("/healthz").status_code == 200
