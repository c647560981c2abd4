"""The console in a real browser: Debian's chromium (``/usr/bin/chromium``, installed by
scripts/install.sh), driven by Playwright, against a real ``kem serve`` on 127.0.0.1 with API keys, its
SQLite store and two published versions. Flows: log in, add an edit, see the new answer beside the old
in the playground, supersede it, read its history, roll back a version; a tenant sees only its
namespace and another namespace's edit is the same page as a missing one; edit text that is markup
shows as text and runs nothing.

``KEM_CONSOLE_SHOTS=DIR`` saves a screenshot of each page there (docs/img/console-*.png are made so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import kem_server
from tests.test_serving import publish_base_as

KEYS = {"admin": "sk-browser-admin", "alice": "sk-browser-alice", "bob": "sk-browser-bob"}
CHROMIUM = os.environ.get("KEM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
XSS = "<script>window.__kem_xss = 1; alert('xss')</script>"


@pytest.fixture(scope="module")
def server(tmp_path_factory, kem_settings):
    tmp = tmp_path_factory.mktemp("console-browser")
    keys = tmp / "keys"
    keys.write_text(f"{KEYS['admin']} *\n{KEYS['alice']} alice\n{KEYS['bob']} bob\n")
    keys.chmod(0o600)
    home = tmp / "b-home"
    v1 = publish_base_as(home, None, kem_settings)  # two published versions (the base weights stand in)
    publish_base_as(home, v1, kem_settings)
    srv = kem_server(tmp, "b", "--keys", str(keys), "--model-version", "current").start()
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), (f"no chromium at {CHROMIUM}: bash scripts/install.sh installs Debian's "
                                      "chromium (as root), or set KEM_CHROMIUM")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def shot(page, name: str) -> None:
    folder = os.environ.get("KEM_CONSOLE_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"console-{name}.png"), full_page=True)


def login(browser, server, who: str):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(90_000)  # a generation on 2 busy CPU cores
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()) if "xss" in d.message
            else d.accept())
    page.goto(server.url + "/console/edits")
    assert "/console/login" in page.url
    if who == "admin":
        shot(page, "login")
    page.fill("input[name=key]", KEYS[who])
    page.click("button[type=submit]")
    page.wait_for_url("**/console/edits")
    return ctx, page, errors


def open_add_form(page) -> None:
    details = page.locator("details:has([data-testid=add-form])")
    if details.get_attribute("open") is None:
        page.click("summary:has-text('Add an edit')")


def test_operator_flow_add_ask_supersede_history_rollback(browser, server):
    ctx, page, errors = login(browser, server, "admin")
    # add an edit through the form
    open_add_form(page)
    form = page.locator("[data-testid=add-form]")
    form.locator("input[name=subject]").fill("Kem Corporation")
    form.locator("input[name=prompt]").fill("The CEO of {} is")
    form.locator("input[name=target_new]").fill("Zora Quill")
    form.locator("input[name=evidence]").fill("press release 2026-12-01")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("[data-testid=edit-subject]")
    assert page.inner_text("[data-testid=edit-status]") == "active"
    assert "Zora Quill" in page.inner_text("[data-testid=edit-fact]")
    edit_url = page.url
    shot(page, "edit")
    # the playground: the old answer beside the new one
    page.goto(server.url + "/console/playground")
    page.fill("textarea[name=text]", "The CEO of Kem Corporation is")
    page.select_option("select[name=kind]", "completion")
    page.select_option("select[name=version]", "v1")
    page.click("[data-testid=playground-form] button[type=submit]")
    page.wait_for_selector("[data-testid=answers]")
    before, after = page.inner_text("[data-testid=answer-1] .text"), page.inner_text("[data-testid=answer-2] .text")
    assert "Zora Quill" not in before and "Zora Quill" in after
    assert "Kem Corporation" in page.inner_text("[data-testid=answer-2] .applied")
    assert page.locator("[data-testid=answer-3]").count() == 1  # v1's weights alone
    shot(page, "playground")
    # supersede it, then read the history of both
    page.goto(edit_url)
    page.fill("[data-testid=supersede-form] input[name=new_target]", "Carla Reyes")
    page.click("[data-testid=supersede-form] button")
    page.wait_for_selector("text=it supersedes")
    assert "Carla Reyes" in page.inner_text("[data-testid=edit-fact]")
    page.goto(edit_url)
    assert page.inner_text("[data-testid=edit-status]") == "superseded"
    history = page.inner_text("[data-testid=history]")
    assert "add" in history and "superseded" in history and "admin:" in history
    # the full-text search finds both, the nearest search ranks them
    page.goto(server.url + "/console/edits?q=Kem+Corporation")
    assert page.locator("tr[data-edit-id]").count() == 2
    shot(page, "edits")
    # roll back the shared model from v2 (current) to v1, with the confirmation
    page.goto(server.url + "/console/versions")
    assert page.inner_text("[data-testid=served]") == "v2"
    shot(page, "versions")
    row = page.locator("form.confirm-rollback:has(input[value=v1])")
    row.locator("input[name=confirm]").fill("v1")
    row.locator("button").click()
    page.wait_for_selector("text=Rolled back shared to v1")
    assert page.inner_text("[data-testid=served]") == "v1"
    assert httpx.get(server.url + "/healthz", headers={"authorization": f"Bearer {KEYS['admin']}"},
                     timeout=30).json()["absorbed_versions"] == ["v1"]
    page.goto(server.url + "/console/health")
    assert "edit-follower" in page.inner_text("[data-testid=health]")
    shot(page, "health")
    page.goto(server.url + "/console/eval")
    shot(page, "eval")
    assert errors == []
    ctx.close()


def test_tenant_sees_only_its_namespace_in_the_browser(browser, server):
    admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEYS['admin']}"}, timeout=60)
    bob_edit = admin.post("/v1/edits", json={"subject": "Bobcorp", "prompt": "The CEO of {} is",
                                             "target_new": "Bob Bobson", "namespace": "bob"}).json()
    admin.post("/v1/edits", json={"subject": "Alicorp", "prompt": "The CEO of {} is", "target_new": "Al Ice",
                                  "namespace": "alice"}).raise_for_status()
    ctx, page, errors = login(browser, server, "alice")
    assert page.inner_text("[data-testid=who]") == "namespace alice"
    text = page.inner_text("main")
    assert "Alicorp" in text and "Bobcorp" not in text
    page.goto(server.url + "/console/edits?q=corp")
    assert "Bobcorp" not in page.inner_text("main")
    foreign = page.goto(server.url + f"/console/edits/{bob_edit['id']}")
    foreign_text = page.inner_text("main").replace(bob_edit["id"], "ID")
    missing = page.goto(server.url + "/console/edits/0123456789abcdef0123456789abcdef")
    missing_text = page.inner_text("main").replace("0123456789abcdef0123456789abcdef", "ID")
    assert foreign.status == missing.status == 404 and foreign_text == missing_text
    assert "Bob Bobson" not in foreign_text
    page.goto(server.url + "/console/versions")
    assert "Shared model" not in page.inner_text("main")  # the shared versions are for admins
    assert errors == []
    ctx.close()


def test_edit_text_that_is_markup_shows_as_text(browser, server):
    ctx, page, errors = login(browser, server, "alice")
    open_add_form(page)
    form = page.locator("[data-testid=add-form]")
    form.locator("input[name=subject]").fill(f"Evil {XSS}")
    form.locator("input[name=prompt]").fill("The CEO of {} is")
    form.locator("input[name=target_new]").fill(f"<img src=x onerror=\"alert('xss')\">{XSS}")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("[data-testid=edit-subject]")
    assert page.inner_text("[data-testid=edit-subject]") == f"Evil {XSS}"
    assert XSS in page.inner_text("[data-testid=edit-fact]")
    page.goto(server.url + "/console/edits?q=Evil")
    assert XSS in page.inner_text("main")
    assert page.evaluate("window.__kem_xss") is None and page.locator("main img").count() == 0
    assert errors == []
    ctx.close()
