"""A property-based cross-tenant check over every route of ``kem serve`` (hypothesis), the console included.

The app's own route table is enumerated (a route added later is covered without editing this file).
For a route with an id in its path, each generated case sends the same request twice as tenant
*alice*: once with an id of tenant *bob* (his edit, his version, his console job) and once with a
missing id of the same shape. The property:

* both answers have the same status and the same body once the id is masked (a foreign id is
  indistinguishable from a missing one);
* nothing of bob's (his edits' texts and ids, his version's and job's names) appears in any body,
  any header or any log record of the request;
* routes with no id in their path, called by alice with generated query parameters and bodies, never
  show bob's texts either (lists, searches, audit, health, the playground);
* bob's data is unchanged at the end (a write that went through would be caught).

Used by tests/test_cross_tenant.py (a small budget on CI) and bench/fuzz_cross_tenant.py (thousands).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BOB_MARK = "Qzxbobsecret"  # in every text of bob's: any leak of his data shows it
MISSING_EDIT = "0" * 32
PARAM_RE = re.compile(r"\{(\w+)(?::\w+)?\}")


class LogTap(logging.Handler):
    """Every log record of the app while a request runs (kem's and uvicorn's loggers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage() + (self.format(record) if record.exc_info else ""))
        except Exception:  # a record that cannot format still counts as seen
            self.lines.append(str(record.msg))


@contextmanager
def tapped() -> Iterator[LogTap]:
    tap = LogTap()
    root = logging.getLogger()
    old = root.level
    root.addHandler(tap)
    root.setLevel(logging.DEBUG)
    try:
        yield tap
    finally:
        root.removeHandler(tap)
        root.setLevel(old)


def _flat(table: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for r in table:
        inner = getattr(r, "original_router", None)  # an included router (the console's)
        if inner is not None:
            ctx = getattr(getattr(r, "include_context", None), "prefix", "") or ""
            yield from _flat(inner.routes, prefix + ctx)
        else:
            yield prefix, r


def routes(app: Any) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, included routers' too."""
    out = []
    for prefix, r in _flat(app.routes):
        methods = getattr(r, "methods", None) or set()
        for m in sorted(methods - {"HEAD", "OPTIONS"}):
            out.append((m, prefix + r.path))
    return sorted(set(out))


def foreign_and_missing(param: str, bob: dict[str, str]) -> tuple[str, str] | None:
    """A value of bob's for a path parameter, and a missing one of the same shape."""
    table = {"edit_id": (bob["edit"], MISSING_EDIT), "job_id": (bob["job"], "f" * len(bob["job"])),
             "version": (bob["version"], "v999"), "group": ("bob", "nobody"), "key_id": (bob["key"], "0" * 12),
             "run": (bob["run"], "no-such-run"), "name": ("metrics", "nothing")}
    return table.get(param)


json_scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=20)
bodies = st.one_of(
    st.just(None),
    st.dictionaries(st.sampled_from(["subject", "prompt", "target_new", "namespace", "status", "q", "text",
                                     "action", "kind", "version", "confirm", "csrf", "new_target", "messages",
                                     "model", "max_tokens"]), json_scalars, max_size=5),
)
queries = st.dictionaries(st.sampled_from(["namespace", "q", "mode", "status", "subject", "limit", "offset", "k",
                                           "as_of", "since", "next"]),
                          st.sampled_from(["bob", "alice", "Qzx", "secret", "nearest", "text", "active", "0", "5",
                                           "Who is the CEO of Qzx Corp?", "", "2020-01-01", "../bob"]),
                          max_size=3)
HEADERS = st.sampled_from([{}, {"x-kem-namespace": "bob"}, {"x-kem-namespace": "alice"}])


def mask(text: str, *ids: str) -> str:
    for i in ids:
        text = text.replace(i, "<ID>")
    return re.sub(r"\b(chatcmpl|cmpl)-[0-9a-f]+", r"\1-<X>", re.sub(r"\d+(\.\d+)? ?ms", "<ms>", text))


def leaks(resp: Any, tap: LogTap, secrets: list[str]) -> list[str]:
    where = [("body", resp.text), ("headers", json.dumps(dict(resp.headers)))] + [("log", line) for line in tap.lines]
    return [f"{w}: {s!r}" for w, text in where for s in secrets if s and s in text]


def run(client: Any, app: Any, alice: str, bob: dict[str, str], secrets: list[str], examples: int,
        stats: Counter[str] | None = None) -> None:
    """Generate ``examples`` cases over every route (see the module docstring); fail on the first breach."""
    table = routes(app)
    assert table, "the app has no routes"
    auth = {"authorization": f"Bearer {alice}"}

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(table), body=bodies, query=queries, headers=HEADERS)
    def case(route: tuple[str, str], body: Any, query: dict[str, str], headers: dict[str, str]) -> None:
        method, template = route
        params = PARAM_RE.findall(template)
        kw: dict[str, Any] = {"params": query, "headers": {**auth, **headers}}
        if body is not None and method in ("POST", "PUT", "PATCH"):
            if template.startswith("/console"):
                kw["data"] = {k: str(v) for k, v in body.items()}
            else:
                kw["json"] = body
        if not params:
            with tapped() as tap:
                r = client.request(method, template, **kw)
            found = leaks(r, tap, secrets)
            assert not found, f"{method} {template} {kw}: {found}"
            assert r.status_code < 500, f"{method} {template} {kw}: {r.status_code} {r.text[:300]}"
            if stats is not None:
                stats[f"{r.status_code}"] += 1
            return
        pairs = [foreign_and_missing(p, bob) for p in params]
        if any(p is None for p in pairs):
            raise AssertionError(f"{template}: no foreign/missing values for {params}; add them to foreign_and_missing")
        foreign_path = missing_path = template
        for p, (theirs, missing) in zip(params, pairs, strict=True):  # type: ignore[misc]
            foreign_path = PARAM_RE.sub(lambda m, p=p, v=theirs: v if m.group(1) == p else m.group(0), foreign_path, count=1)
            missing_path = PARAM_RE.sub(lambda m, p=p, v=missing: v if m.group(1) == p else m.group(0), missing_path, count=1)
        with tapped() as tap:
            r1 = client.request(method, foreign_path, **kw)
        found = leaks(r1, tap, [x for x in secrets if x not in foreign_path])  # echoing the caller's own input is no leak
        assert not found, f"{method} {foreign_path} {kw}: {found}"
        r2 = client.request(method, missing_path, **kw)
        ids = [v for pair in pairs for v in pair if v]  # type: ignore[union-attr]
        assert r1.status_code == r2.status_code, (method, foreign_path, kw, r1.status_code, r2.status_code,
                                                  r1.text[:300], r2.text[:300])
        assert mask(r1.text, *ids) == mask(r2.text, *ids), (method, foreign_path, kw, r1.text[:500], r2.text[:500])
        if stats is not None:
            stats[f"pair {r1.status_code}"] += 1

    case()
