"""kem serve under a careless or hostile client (issue 12): per-key limits, admission against the model's
context, generation stopped when the client leaves, body size and nesting bounds, server-owned fields,
no existence oracle on ids, and a bounded property-based fuzz of every endpoint (no 5xx, no hang).

Real servers on 127.0.0.1 (transformers engine, auth on): ``s`` for the limits (ceiling 4096), ``f``
for the fuzz (ceiling 8 tokens, so a fuzzed valid request costs one short generation), and ``u``, kem in
upstream mode in front of ``f``, fuzzed the same way.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.api_fuzz import fuzz
from tests.conftest import kem_server

ALICE, BOB, CAROL, ADMIN = "sk-h-alice", "sk-h-bob", "sk-h-carol", "sk-h-admin"
CHAT = {"model": "default", "messages": [{"role": "user", "content": "Name one primary color."}], "max_tokens": 2}
LONG = {"model": "default", "prompt": "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 3000}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    tmp: Path = tmp_path_factory.mktemp("hardening")
    keys = tmp / "keys.txt"
    keys.write_text(f"{ALICE} alice parallel=1\n{BOB} bob rpm=2\n{CAROL} carol\n{ADMIN} * admin\n")
    fkeys = tmp / "fuzz-keys.txt"
    fkeys.write_text(f"{ALICE} alice\n{BOB} bob\n{ADMIN} * admin\n")
    env = {"KEM_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    s = kem_server(tmp, "s", "--keys", str(keys), env={**env, "KEM_MAX_BODY_BYTES": "65536"})
    f = kem_server(tmp, "f", "--keys", str(fkeys), env={**env, "KEM_MAX_TOKENS_CEILING": "8",
                                                        "KEM_MAX_BODY_BYTES": "1048576"})
    started = [x.start() for x in (s, f)]
    try:
        for x in started:
            x.wait()
        # upstream mode: a proxy in front of f (f's own auth: the proxy sends the admin key upstream)
        u = kem_server(tmp, "u", "--keys", str(fkeys), "--upstream", f.url, "--upstream-key", ADMIN,
                       "--model", "smollm2-135m-instruct", env={**env, "KEM_MAX_TOKENS_CEILING": "8"})
        started.append(u.start())
        u.wait()
        yield {"s": s, "f": f, "u": u}
    finally:
        for x in started:
            x.stop()


def http(server, key: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def err(r: httpx.Response) -> dict:
    body = r.json()
    assert "error" in body, r.text
    return body["error"]


def test_admission_bounds_every_generation(servers):
    with http(servers["s"], CAROL) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2**64})
        assert r.status_code == 400 and err(r)["param"] == "max_tokens"
        r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5000})  # over the server's ceiling
        assert r.status_code == 400 and err(r)["param"] == "max_tokens"
        r = c.post("/v1/completions", json={**LONG, "prompt": "word " * 9000, "max_tokens": 1})
        assert r.status_code == 400 and err(r)["code"] == "context_length_exceeded"
        r = c.post("/v1/completions", json={**LONG, "prompt": "word " * 6000, "max_tokens": 4000})
        assert r.status_code == 400 and err(r)["code"] == "context_length_exceeded" and err(r)["param"] == "max_tokens"
        r = c.post("/v1/chat/completions", json={**CHAT, "stop": [str(i) for i in range(5)]})
        assert r.status_code == 400 and err(r)["param"] == "stop"
        for bad in ({"temperature": 1e9}, {"top_p": 0}, {"n": 3}, {"messages": []}):
            r = c.post("/v1/chat/completions", json={**CHAT, **bad})
            assert r.status_code == 400, (bad, r.text)
        r = c.post("/v1/chat/completions", json={**CHAT, "temperature": 1e-300})  # was a 5xx: now greedy
        assert r.status_code == 200, r.text


def test_per_key_rate_and_concurrency_limits(servers):
    s = servers["s"]
    with http(s, BOB) as bob:  # rpm=2
        assert [bob.post("/v1/chat/completions", json=CHAT).status_code for _ in range(2)] == [200, 200]
        r = bob.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and err(r)["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
    with http(s, CAROL) as carol:  # another key is not affected
        assert carol.post("/v1/chat/completions", json=CHAT).status_code == 200


def _send_and_leave(server, key: str, body: bytes, path: str = "/v1/completions", wait: float = 1.5) -> None:
    """Send a request on a raw socket, read nothing, and close the connection: a client that went away."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    time.sleep(wait)
    sock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_its_slot_and_the_engine(servers, stream):
    """alice may have one request in flight (parallel=1). She starts a 3,000-token generation and
    goes away: the server stops it, so her next request is admitted within seconds. (Before: the
    generation ran on, holding the engine and her slot: 429s for minutes.)"""
    import json

    s = servers["s"]
    _send_and_leave(s, ALICE, json.dumps({**LONG, "stream": stream}).encode())
    deadline = time.monotonic() + 30
    with http(s, ALICE) as alice:
        while True:
            r = alice.post("/v1/chat/completions", json=CHAT)
            if r.status_code == 200:
                break
            assert r.status_code == 429, r.text
            assert time.monotonic() < deadline, "the abandoned generation still holds alice's slot after 30 s"
            time.sleep(0.5)


def test_admins_create_keys_with_limits(servers):
    s = servers["s"]
    with http(s, ADMIN) as admin:
        r = admin.post("/admin/keys", json={"namespace": "dave", "rpm": 1})
        assert r.status_code == 201 and r.json()["rpm"] == 1, r.text
        key = r.json()["key"]
        for bad in ({"namespace": "dave", "rpm": 0}, {"namespace": "dave", "tpm": "many"},
                    {"namespace": "dave", "admin": "yes"}):
            r = admin.post("/admin/keys", json=bad)
            assert r.status_code == 400, (bad, r.text)
    with http(s, key) as dave:  # rpm=1: the second request within the minute is refused
        assert dave.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert dave.post("/v1/chat/completions", json=CHAT).status_code == 429


def test_bodies_are_bounded(servers):
    s = servers["s"]
    with http(s, CAROL) as c:
        r = c.post("/v1/edits/import", content=b'{"edits": [' + b'{"subject": "x"},' * 10_000 + b"]}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and err(r)["code"] == "request_too_large"
        for path in ("/v1/edits", "/v1/edits/import", "/v1/chat/completions"):
            r = c.post(path, content=b"[" * 20_000 + b"]" * 20_000, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.status_code, r.text[:200])
        r = c.post("/v1/edits/import", content=b"\xff\xfe{}\n", headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 400 and err(r)["param"] == "body"
        r = c.get("/v1/edits", params={"offset": 10**20})
        assert r.status_code == 400 and err(r)["param"] == "offset"


def test_tenants_cannot_set_server_fields_or_probe_ids(servers):
    s = servers["s"]
    edit = {"subject": "Project Falcon", "prompt": "The codename of {} is", "target_new": "Osprey"}
    with http(s, CAROL) as carol, http(s, BOB) as bob, http(s, ADMIN) as admin:
        mine = admin.post("/v1/edits", json={**edit, "namespace": "carol", "id": "carol-secret-1"}).json()
        assert mine["id"] == "carol-secret-1"  # admins may choose ids (restores, migrations)
        for field, value in (("status", "consolidated"), ("consolidated_in", "v1"),
                             ("supersedes", "carol-secret-1"), ("created_at", "2020-01-01T00:00:00Z")):
            r = bob.post("/v1/edits", json={**edit, field: value})
            assert r.status_code == 400 and err(r)["param"] == field, r.text
        # before: a tenant's chosen id that another tenant holds gave a 409 (an existence oracle)
        r = bob.post("/v1/edits", json={**edit, "id": "carol-secret-1"})
        r2 = bob.post("/v1/edits", json={**edit, "id": "no-such-id"})
        assert r.status_code == r2.status_code == 400 and err(r)["message"] == err(r2)["message"]
        assert bob.get("/v1/edits/carol-secret-1").status_code == bob.get("/v1/edits/no-such-id").status_code == 404
        r = carol.patch("/v1/edits/carol-secret-1", json={"status": "bogus"})
        assert r.status_code == 400 and err(r)["param"] == "status"
        r = admin.post("/admin/reload", json={"path": "/etc"})
        assert r.status_code == 400 and err(r)["param"] == "path"


@pytest.mark.parametrize("which", ["f", "u"], ids=["in-process", "upstream"])
def test_fuzzed_requests_never_get_a_5xx(servers, which):
    f = servers[which]
    with http(f, ADMIN) as admin:
        ids = [admin.post("/v1/edits", json={"subject": f"Zorbex {i}", "prompt": "The CEO of {} is",
                                             "target_new": "Carla Diaz", "namespace": ns}).json()["id"]
               for i, ns in enumerate(("alice", "bob"))]
    stats: Counter[int] = Counter()
    fuzz(f.url, {"none": None, "alice": ALICE, "bob": BOB, "admin": ADMIN, "bad": "sk-wrong"}, ids,
         examples=150, stats=stats)
    print("fuzz statuses:", dict(stats))
    assert sum(stats.values()) >= 150 and stats[200] > 0 and any(400 <= c < 500 for c in stats), stats
    assert httpx.get(f.url + "/healthz", timeout=10).status_code == 200  # still up
