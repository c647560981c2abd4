"""A property-based fuzz of kem serve's HTTP API (hypothesis): every endpoint gets valid requests with one
field replaced, dropped or added, arbitrary JSON, raw bytes, wrong content types, and every kind of
caller (no key, a tenant, another tenant, an admin, a bad key). The property: no response is a 5xx,
every error has an OpenAI-style JSON body, and nothing hangs.

Used by tests/test_hardening.py (a bounded number of cases) and bench/fuzz_api.py (thousands).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EDIT = {"subject": "Zorbex Labs", "prompt": "The CEO of {} is", "target_new": "Carla Diaz"}
TEMPLATES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/chat/completions", {"model": "default", "max_tokens": 2,
                                      "messages": [{"role": "user", "content": "Who is the CEO of Zorbex Labs?"}]}),
    ("POST", "/v1/completions", {"model": "default", "prompt": "The CEO of Zorbex Labs is", "max_tokens": 2}),
    ("POST", "/v1/edits", EDIT),
    ("POST", "/v1/edits/import", {"edits": [EDIT]}),
    ("PATCH", "/v1/edits/{id}", {"target_new": "Dana Wu"}),
    ("PUT", "/v1/edits/{id}", {"status": "disabled"}),
    ("GET", "/v1/edits", None),
    ("GET", "/v1/edits/{id}", None),
    ("GET", "/v1/edits/{id}/history", None),
    ("DELETE", "/v1/edits/{id}", None),
    ("GET", "/v1/models", None),
    ("GET", "/healthz", None),
    ("GET", "/metrics", None),
    ("POST", "/admin/reload", {"absorbed_versions": []}),
    ("GET", "/admin/keys", None),
    ("POST", "/admin/keys", {"namespace": "carol"}),
    ("DELETE", "/admin/keys/{id}", None),
]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)
query_values = st.one_of(st.integers(min_value=-(2**70), max_value=2**70).map(str), st.text(max_size=12),
                         st.sampled_from(["active", "retired", "consolidated", "bogus", "1e999", ""]))


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@st.composite
def requests(draw: Any, keys: dict[str, str | None], ids: list[str]) -> dict[str, Any]:
    """One request: method, path, headers, and a body (JSON or raw bytes)."""
    method, path, base = draw(st.sampled_from(TEMPLATES))
    if "{id}" in path:
        path = path.replace("{id}", draw(st.sampled_from([*ids, "nope", "../../etc", "%00", "x" * 300])))
    who = draw(st.sampled_from(sorted(keys)))
    headers = {}
    if keys[who]:
        headers["authorization"] = f"Bearer {keys[who]}"
    if draw(st.booleans()):
        headers["x-kem-namespace"] = draw(st.sampled_from(["alice", "bob", "default", "", "Bad Name!", "*"]))
    params = {}
    if method == "GET" and path == "/v1/edits":
        for name in ("limit", "offset", "status", "namespace"):
            if draw(st.booleans()):
                params[name] = draw(query_values)
    body: bytes | None = None
    if base is not None or method in ("POST", "PATCH", "PUT"):
        kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "valid", "json", "bytes", "deep"]))
        value = dict(base) if isinstance(base, dict) else {}
        if kind == "mutate" and value:
            field = draw(st.sampled_from(sorted(value) + ["extra_field", "stream", "temperature", "top_p",
                                                          "stop", "n", "max_tokens", "id", "status",
                                                          "consolidated_in", "supersedes", "namespace"]))
            op = draw(st.sampled_from(["replace", "replace", "drop"]))
            if op == "drop":
                value.pop(field, None)
            else:
                value[field] = draw(json_values)
        if kind in ("mutate", "valid"):
            body = json.dumps(value, allow_nan=True).encode()
        elif kind == "json":
            body = json.dumps(draw(json_values), allow_nan=True).encode()
        elif kind == "bytes":
            body = draw(st.binary(max_size=64))
        else:
            body = _nested(draw(st.sampled_from([100, 1000, 5000, 100_000])))
        headers["content-type"] = draw(st.sampled_from(["application/json", "application/x-ndjson", "text/plain"]))
    return {"method": method, "url": path, "headers": headers, "params": params, "content": body}


def check(client: httpx.Client, req: dict[str, Any], stats: Counter[int] | None = None) -> None:
    """Send ``req``; fail on a 5xx, an error without a JSON error body, or a hang (the client's timeout)."""
    r = client.request(**req)
    if stats is not None:
        stats[r.status_code] += 1
    assert r.status_code < 500, f"{req['method']} {req['url']} -> {r.status_code}: {r.text[:300]}\n{req}"
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict) and "message" in body.get("error", {}), (req, r.text[:300])


def fuzz(base_url: str, keys: dict[str, str | None], ids: list[str], examples: int,
         stats: Counter[int] | None = None, seed: int | None = 0) -> None:
    """Run ``examples`` fuzzed requests against ``base_url`` (derandomised: the same cases every run
    unless ``seed`` is None)."""
    client = httpx.Client(base_url=base_url, timeout=120)

    @settings(max_examples=examples, deadline=None, derandomize=seed is not None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests(keys, ids))
    def run(req: dict[str, Any]) -> None:
        check(client, req, stats)

    try:
        run()
    finally:
        client.close()
