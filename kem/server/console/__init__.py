"""The operator console of ``kem serve``, under ``/console`` (docs/console.md).

Server-rendered pages (Jinja2, autoescaped: edit text always shows as text), one small script and one
style sheet shipped in the wheel, nothing loaded from the internet. Every action goes through the same
service layer as the HTTP API (:class:`~kem.server.edits.Edits`, :class:`~kem.server.serving.Serving`,
:class:`~kem.versions.VersionStore`), for the same :class:`~kem.server.auth.Principal`: a tenant key sees
and changes only its namespace, and another tenant's edit is the same 404 page as a missing one.

Auth: a login form takes the API key and keeps it in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped
to ``/console``; scripts and tests may send ``Authorization: Bearer KEY`` instead. Forms posted with the
cookie carry a CSRF token derived from the key (an HMAC: stateless, the same on every replica); requests
that authenticate by header need none (a browser never adds that header across sites). Every response
sets a content security policy (scripts and styles from ``/console/static`` only), ``nosniff``, no
framing and ``no-store``. ``KEM_CONSOLE=false`` turns the whole console off.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from kem.errors import AuthError, ForbiddenError, KemError, NotFoundError, ValidationError
from kem.server.auth import KeyRing, Principal
from kem.server.jobs import ConsoleJobs

if TYPE_CHECKING:
    from kem.server.serving import Serving
    from kem.settings import Settings

HERE = Path(__file__).parent
COOKIE = "kem_console"
PAGE = 25  # edits per page
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; connect-src 'self'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "x-frame-options": "DENY",
                    "referrer-policy": "no-referrer", "cache-control": "no-store"}
NAV = [("edits", "Edits"), ("playground", "Playground"), ("versions", "Versions"), ("eval", "Evaluation"),
       ("audit", "Audit"), ("health", "Health")]
STATUSES = ["active", "pending", "consolidated", "superseded", "retired", "rejected"]
EDITABLE = ("subject", "prompt", "target_new", "target_true", "paraphrases", "valid_from", "valid_until", "evidence",
            "source", "relation")


class _Login(Exception):
    """No valid key: send the browser to the login form."""


def _env() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    def missing(v: Any) -> bool:
        return v is None or isinstance(v, jinja2.Undefined)

    env.filters["pct"] = lambda v: "-" if missing(v) else f"{100 * float(v):.1f}"
    env.filters["num"] = lambda v: "-" if missing(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))
    env.filters["json"] = lambda v: json.dumps(v, indent=1, ensure_ascii=False, default=str)
    return env


def _form_value(form: dict[str, list[str]], name: str) -> str:
    return (form.get(name) or [""])[0]


def build_console(serving: Serving, keys: KeyRing, settings: Settings, jobs: ConsoleJobs | None = None) -> APIRouter:
    """The ``/console`` routes over ``serving`` (its edits API, engine and versions) for ``keys``;
    ``jobs``: where dry runs started from the console are kept (a new one by default)."""
    env = _env()
    router = APIRouter(prefix="/console")
    edits = serving.edits
    jobs = jobs if jobs is not None else ConsoleJobs(settings)
    process_secret = secrets.token_bytes(32)  # CSRF secret when auth is off (one process, a developer's)

    # ---- who is calling -------------------------------------------------------------------------------
    def caller(request: Request) -> tuple[Principal, bool]:
        """The principal, and whether it came from the cookie (then forms need the CSRF token)."""
        h = request.headers
        if h.get("authorization") or h.get("x-api-key"):
            return keys.authenticate(h.get("authorization"), h.get("x-api-key")), False
        if not keys.enabled:
            return keys.authenticate(None), True
        key = request.cookies.get(COOKIE)
        if not key:
            raise _Login()
        try:
            return keys.authenticate(f"Bearer {key}"), True
        except AuthError:
            raise _Login() from None

    def csrf_token(request: Request) -> str:
        secret = request.cookies.get(COOKIE, "").encode() if keys.enabled else process_secret
        return hmac.new(secret, b"kem-console-csrf", hashlib.sha256).hexdigest()

    async def form_of(request: Request, cookie: bool) -> dict[str, list[str]]:
        """The posted form (urlencoded), its CSRF token checked when the caller came by cookie."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/"):
            raw = await request.form()
            form = {k: [v if isinstance(v, str) else ""] for k, v in raw.multi_items()}
        else:
            form = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
        if cookie and not hmac.compare_digest(_form_value(form, "csrf"), csrf_token(request)):
            raise ForbiddenError("the form's CSRF token is missing or wrong: reload the page and try again")
        return form

    def render(request: Request, template: str, p: Principal | None, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = env.get_template(template).render(
            request_path=request.url.path, principal=p, nav=NAV, csrf=csrf_token(request) if p else "",
            auth=keys.enabled, **ctx)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def page(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """Errors as pages: a kem error keeps its status (404 for another tenant's edit, as for a missing
        one), no key sends the browser to the login form."""

        @functools.wraps(fn)  # FastAPI reads the parameters of ``fn``
        async def wrapped(request: Request, **kw: Any) -> Response:
            try:
                return await fn(request, **kw)
            except _Login:
                nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/console/login?next={quote(nxt, safe='')}", status_code=303,
                                        headers=SECURITY_HEADERS)
            except KemError as exc:
                try:
                    p: Principal | None = caller(request)[0]
                except (_Login, KemError):
                    p = None
                return render(request, "error.html", p, status=exc.status_code, status_code=exc.status_code,
                              message=str(exc), field=getattr(exc, "field", None))

        return wrapped

    def back(url: str, **params: Any) -> RedirectResponse:
        q = urlencode({k: v for k, v in params.items() if v not in (None, "")})
        return RedirectResponse(url + (f"?{q}" if q else ""), status_code=303, headers=SECURITY_HEADERS)

    # ---- static files and login -----------------------------------------------------------------------
    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        path = HERE / "static" / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise NotFoundError(f"no static file {name!r}")
        media = {"js": "text/javascript", "css": "text/css"}.get(path.suffix.lstrip("."), "application/octet-stream")
        return FileResponse(path, media_type=media, headers={**SECURITY_HEADERS, "cache-control": "max-age=3600"})

    @router.get("")
    @router.get("/")
    async def home() -> Response:
        return back("/console/edits")

    @router.get("/login")
    async def login_form(request: Request, next: str = "/console/edits") -> Response:
        return render(request, "login.html", None, next=_safe_next(next), error=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        key, nxt = _form_value(form, "key").strip(), _safe_next(_form_value(form, "next"))
        try:
            keys.authenticate(f"Bearer {key}")
        except KemError:
            return render(request, "login.html", None, status=401, next=nxt, error="This key is not valid.")
        resp = RedirectResponse(nxt, status_code=303, headers=SECURITY_HEADERS)
        resp.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/console",
                        secure=request.url.scheme == "https")
        return resp

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        p, cookie = caller(request)
        await form_of(request, cookie)
        resp = RedirectResponse("/console/login", status_code=303, headers=SECURITY_HEADERS)
        resp.delete_cookie(COOKIE, path="/console")
        return resp

    # ---- edits ------------------------------------------------------------------------------------------
    @router.get("/edits")
    @page
    async def edits_page(request: Request) -> Response:
        p, _ = caller(request)
        qp = request.query_params
        q, mode = qp.get("q", ""), qp.get("mode", "text")
        ns = qp.get("namespace") or None
        status, subject, as_of = qp.get("status") or None, qp.get("subject") or None, qp.get("as_of") or None
        try:
            offset = max(0, int(qp.get("offset", "0") or 0))
        except ValueError:
            raise ValidationError("offset must be a whole number", field="offset") from None
        t0 = time.perf_counter()
        hits: list[dict[str, Any]] | None = None
        page_: Any = None
        if mode == "nearest" and q.strip():
            found = await edits.search(p, q, ns, k=PAGE)
            hits = [h for h in found["data"] if (status is None or h["status"] == status)
                    and (subject is None or h["subject"].casefold() == subject.casefold())]
        else:
            page_ = await edits.list(p, ns, limit=PAGE, offset=offset, status=status, q=q or None, subject=subject,
                                     as_of=as_of)
        namespaces = (await asyncio.to_thread(serving.editor.namespaces)) if p.admin else [p.namespace]
        server_ms = (time.perf_counter() - t0) * 1000
        params = {"q": q, "mode": mode, "namespace": ns or "", "status": status or "", "subject": subject or "",
                  "as_of": as_of or ""}
        resp = render(request, "edits.html", p, page=page_, hits=hits, params=params, statuses=STATUSES,
                      namespaces=namespaces, server_ms=server_ms, page_size=PAGE,
                      query=lambda **kw: urlencode({**params, **kw}), notice=qp.get("notice"),
                      error=qp.get("error"))
        resp.headers["server-timing"] = (f"store;dur={server_ms:.1f}, "
                                         f"total;dur={(time.perf_counter() - t0) * 1000:.1f}")
        return resp

    @router.post("/edits")
    @page
    async def add_edit(request: Request) -> Response:
        p, cookie = caller(request)
        form = await form_of(request, cookie)
        body = _edit_fields(form)
        policy = _form_value(form, "on_conflict") or "supersede"
        made = await edits.create(p, body, _form_value(form, "namespace") or None, policy)
        sup = made.get("supersedes") or []
        notice = f"Added edit {made['id']}" + (f"; it supersedes {', '.join(sup)}" if sup else "")
        return back(f"/console/edits/{made['id']}", namespace=made["namespace"] if p.admin else None, notice=notice)

    @router.post("/edits/import")
    @page
    async def import_edits(request: Request) -> Response:
        p, cookie = caller(request)
        form = await form_of(request, cookie)
        upload = (await request.form()).get("file")  # Starlette keeps the parsed form: no second parse
        if upload is None or isinstance(upload, str):
            raise ValidationError("choose a file to import", field="file")
        data = await upload.read()
        if not data.strip():
            raise ValidationError("the file is empty", field="file")
        result = await edits.import_file(p, data, _form_value(form, "namespace") or None,
                                         _form_value(form, "on_conflict") or "supersede")
        return render(request, "imported.html", p, result=result, filename=upload.filename or "file")

    @router.get("/edits/{edit_id}")
    @page
    async def edit_page(request: Request, edit_id: str) -> Response:
        p, _ = caller(request)
        ns = request.query_params.get("namespace") or None
        edit = await edits.get(p, edit_id, ns)
        history = (await edits.history(p, edit_id, ns))["data"]
        return render(request, "edit.html", p, edit=edit, history=history, editable=EDITABLE,
                      notice=request.query_params.get("notice"), ns=ns or "")

    @router.post("/edits/{edit_id}")
    @page
    async def change_edit(request: Request, edit_id: str) -> Response:
        """One form, several actions: save (change fields), supersede (a new edit of the same fact),
        retire, delete, approve, reject."""
        p, cookie = caller(request)
        form = await form_of(request, cookie)
        ns = _form_value(form, "ns") or None
        action = _form_value(form, "action")
        if action == "save":
            current = await edits.get(p, edit_id, ns)
            changes = {k: v for k, v in _edit_fields(form).items() if v != current.get(k)}
            if not changes:
                return back(f"/console/edits/{edit_id}", namespace=ns, notice="Nothing changed")
            await edits.update(p, edit_id, changes, ns)
            return back(f"/console/edits/{edit_id}", namespace=ns, notice=f"Saved: {', '.join(sorted(changes))}")
        if action == "supersede":
            old = await edits.get(p, edit_id, ns)
            target = _form_value(form, "new_target").strip()
            if not target:
                raise ValidationError("give the new target that supersedes this edit", field="new_target")
            body = {"subject": old["subject"], "prompt": old["prompt"], "target_new": target,
                    "paraphrases": old.get("paraphrases") or [], "relation": old.get("relation"),
                    "evidence": _form_value(form, "evidence") or None,
                    "valid_from": _form_value(form, "valid_from") or None, "namespace": old["namespace"]}
            made = await edits.create(p, {k: v for k, v in body.items() if v is not None}, None, "supersede")
            return back(f"/console/edits/{made['id']}", namespace=ns,
                        notice=f"Added {made['id']}; it supersedes {', '.join(made.get('supersedes') or []) or 'nothing'}")
        if action == "retire":
            await edits.update(p, edit_id, {"status": "retired"}, ns)
            return back(f"/console/edits/{edit_id}", namespace=ns, notice="Retired")
        if action == "delete":
            await edits.delete(p, edit_id, ns)
            return back("/console/edits", notice=f"Deleted edit {edit_id} (its history stays)")
        if action in ("approve", "reject"):
            await edits.review(p, edit_id, action == "approve", ns)
            return back(f"/console/edits/{edit_id}", namespace=ns, notice=f"{action.capitalize()}d")
        raise ValidationError(f"unknown action {action!r}", field="action")

    # ---- playground -------------------------------------------------------------------------------------
    @router.get("/playground")
    @page
    async def playground_form(request: Request) -> Response:
        p, _ = caller(request)
        return render(request, "playground.html", p, result=None, form={"kind": "chat", "text": "", "namespace": "",
                                                                         "version": "", "as_of": ""},
                      versions=await asyncio.to_thread(_version_names, settings))

    @router.post("/playground")
    @page
    async def playground(request: Request) -> Response:
        from kem.edit import parse_time
        from kem.server.protocol import ChatCompletionRequest, CompletionRequest

        started = time.perf_counter()
        p, cookie = caller(request)
        posted = await form_of(request, cookie)
        form = {k: _form_value(posted, k) for k in ("kind", "text", "namespace", "version", "as_of")}
        text = form["text"].strip()
        if not text:
            raise ValidationError("type a question or a prompt", field="text")
        ns = p.namespace_for(form["namespace"] or None)
        as_of = parse_time(form["as_of"] or None, "as_of")
        chat = form["kind"] != "completion"
        tokens = int(settings.max_new_tokens)
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}] if chat else None,
                                "prompt": None if chat else text, "max_tokens": tokens}
        body = {k: v for k, v in body.items() if v is not None}
        req_cls: Any = ChatCompletionRequest if chat else CompletionRequest
        raw = json.dumps(body).encode()
        columns: list[dict[str, Any]] = []
        for label, use_edits in (("unedited (served weights, no edits)", False), ("with kem", True)):
            req = req_cls.model_validate(body)
            t0 = time.perf_counter()
            res = await serving.serve(req, raw, ns, caller=p, as_of=as_of, use_edits=use_edits)
            ms = (time.perf_counter() - t0) * 1000
            choice = res.body["choices"][0] if res.body else {}
            answer = choice.get("message", {}).get("content") if chat else choice.get("text")
            columns.append({"label": label, "answer": answer, "ms": ms,
                            "applied": [{"id": s.edit.id, "subject": s.edit.subject, "target_new": s.edit.target_new,
                                         "score": float(s.score), "via": s.via} for s in res.applied],
                            "request": res.request if (p.admin and use_edits) else None})
        if form["version"]:
            if not p.admin:
                raise ForbiddenError("answering on another model version needs an admin key")
            t0 = time.perf_counter()
            request_: Any = [{"role": "user", "content": text}] if chat else text
            answer = await serving.on_version(form["version"], request_, max_tokens=tokens)
            columns.append({"label": f"version {form['version']} (its weights alone)", "answer": answer,
                            "ms": (time.perf_counter() - t0) * 1000, "applied": [], "request": None})
        resp = render(request, "playground.html", p, result={"columns": columns, "namespace": ns}, form=form,
                      versions=await asyncio.to_thread(_version_names, settings))
        answering = sum(float(c["ms"]) for c in columns)  # the serving calls (rewrite + model), as the API makes them
        console = (time.perf_counter() - started) * 1000 - answering
        resp.headers["server-timing"] = f"answers;dur={answering:.1f}, console;dur={console:.1f}"
        return resp

    # ---- versions ---------------------------------------------------------------------------------------
    @router.get("/versions")
    @page
    async def versions_page(request: Request) -> Response:
        p, _ = caller(request)
        groups = await asyncio.to_thread(_versions_view, settings, p)
        return render(request, "versions.html", p, groups=groups, served=serving.version or "base",
                      jobs=jobs.list(p), methods=_methods(), notice=request.query_params.get("notice"))

    @router.get("/versions/{group}/{version}")
    @page
    async def version_page(request: Request, group: str, version: str) -> Response:
        p, _ = caller(request)
        ns = None if group == "shared" else group
        if ns is None and not p.admin:
            raise NotFoundError(f"no version {version!r}")
        if ns is not None:
            _own(p, ns, f"no version {version!r}")
        manifest = await asyncio.to_thread(_manifest, settings, ns, version)
        return render(request, "version.html", p, m=manifest, group=group)

    @router.post("/versions/rollback")
    @page
    async def rollback(request: Request) -> Response:
        from kem.server.protocol import ReloadRequest
        from kem.versions import versions_for

        p, cookie = caller(request)
        form = await form_of(request, cookie)
        group, version, confirm = (_form_value(form, k).strip() for k in ("group", "version", "confirm"))
        if confirm != version:
            raise ValidationError(f"type the version name ({version!r}) to confirm the rollback", field="confirm")
        ns = None if group in ("", "shared") else group
        if ns is None and not p.admin:
            raise ForbiddenError("rolling back the shared model needs an admin key")
        if ns is not None and not p.admin:
            _own(p, ns, f"no version {version!r}")

        def move() -> None:
            with versions_for(settings, ns) as vs:
                vs.rollback(version)

        await asyncio.to_thread(move)
        if ns is None:  # serve it now (what `POST /admin/reload {"version": ...}` does)
            await serving.reload(ReloadRequest(version=version))
        else:
            serving.editor.tenants.invalidate(ns)
        return back("/console/versions", notice=f"Rolled back {group or 'shared'} to {version}")

    @router.post("/versions/dry-run")
    @page
    async def dry_run(request: Request) -> Response:
        p, cookie = caller(request)
        form = await form_of(request, cookie)
        method = _form_value(form, "method") or "memit"
        if method not in _methods():
            raise ValidationError(f"method must be one of {', '.join(_methods())}", field="method")
        ns = _form_value(form, "namespace") or None
        if not p.admin:
            ns = _own(p, ns or p.namespace, "no such namespace")
        job = jobs.start(p, method, ns)
        return back(f"/console/jobs/{job.id}")

    @router.get("/jobs/{job_id}")
    @page
    async def job_page(request: Request, job_id: str) -> Response:
        p, _ = caller(request)
        job = jobs.get(p, job_id)
        return render(request, "job.html", p, job=job, log=job.tail())

    # ---- evaluation -------------------------------------------------------------------------------------
    @router.get("/eval")
    @page
    async def eval_page(request: Request) -> Response:
        p, _ = caller(request)
        runs = await asyncio.to_thread(_eval_runs, settings) if p.admin else []
        return render(request, "eval.html", p, runs=runs)

    @router.get("/eval/{run}")
    @page
    async def eval_run(request: Request, run: str) -> Response:
        p, _ = caller(request)
        if not p.admin:
            raise NotFoundError(f"no evaluation run {run!r}")
        data = await asyncio.to_thread(_eval_run, settings, run)
        return render(request, "eval_run.html", p, run=run, **data)

    @router.get("/eval/{run}/{name}.png")
    @page
    async def eval_plot(request: Request, run: str, name: str) -> Response:
        p, _ = caller(request)
        path = _eval_dir(settings) / run / f"{name}.png"
        if not p.admin or not _plain(run) or not _plain(name) or not path.is_file():
            raise NotFoundError(f"no plot {name!r}")
        return FileResponse(path, media_type="image/png", headers=SECURITY_HEADERS)

    # ---- audit ------------------------------------------------------------------------------------------
    @router.get("/audit")
    @page
    async def audit(request: Request) -> Response:
        p, _ = caller(request)
        qp = request.query_params
        try:
            since = max(0, int(qp.get("since", "0") or 0))
        except ValueError:
            raise ValidationError("since must be a whole number", field="since") from None
        rows = await edits.audit(p, qp.get("namespace") or None, since=since, limit=100)
        return render(request, "audit.html", p, rows=rows["data"], next_since=rows["next_since"],
                      namespace=qp.get("namespace") or "")

    # ---- health -----------------------------------------------------------------------------------------
    @router.get("/health")
    @page
    async def health(request: Request) -> Response:
        from kem.keys import KeyLimits

        p, _ = caller(request)
        body = serving.health() if p.admin else {"status": "ok"}
        rows = []
        if keys.enabled:
            listed = keys.list() if p.admin else [r for r in keys.list() if r["id"] == p.key_id]
            for row in listed:
                limits = KeyLimits(**{k: int(str(row[k])) for k in ("rpm", "tpm", "parallel") if k in row})
                rows.append({**row, **serving.limiter.usage(str(row["id"]), limits)})
        else:
            rows.append({"id": "(auth off)", "namespace": p.namespace, "admin": True,
                         **serving.limiter.usage(p.key_id, p.limits)})
        stats = {"edits": await asyncio.to_thread(serving.editor.count, p.list_scope(None)),
                 "store_revision": await asyncio.to_thread(serving.editor.store_revision) if p.admin else None}
        return render(request, "health.html", p, health=body, keys=rows, stats=stats)

    return router


# ---- helpers (no request in them) -------------------------------------------------------------------------
def _safe_next(nxt: str) -> str:
    """Only console paths: a login link cannot send the browser elsewhere."""
    return nxt if nxt.startswith("/console") and "//" not in nxt and "\\" not in nxt else "/console/edits"


def _plain(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")


def _own(p: Principal, ns: str, missing: str) -> str:
    """A tenant naming another namespace gets the same 404 as for something missing."""
    if ns != p.namespace and not p.admin:
        raise NotFoundError(missing)
    return ns


def _edit_fields(form: dict[str, list[str]]) -> dict[str, Any]:
    """The Edit fields of a form (empty ones left out; paraphrases one per line)."""
    body: dict[str, Any] = {}
    for name in EDITABLE:
        value = _form_value(form, name).strip()
        if name == "paraphrases":
            lines = [line.strip() for line in value.splitlines() if line.strip()]
            if lines or name in form:
                body[name] = lines
        elif value:
            body[name] = value
    return body


def _methods() -> list[str]:
    import kem.consolidation.builtin_methods  # noqa: F401  registers the built-in methods
    from kem.consolidation.method_registry import list_methods

    return list_methods()


def _version_names(settings: Settings) -> list[str]:
    from kem.versions import versions_for

    with versions_for(settings) as vs:
        return ["base", *(m.version for m in vs.list())]


def _versions_view(settings: Settings, p: Principal) -> list[dict[str, Any]]:
    """Shared versions (admins) and tenants' adapter versions (an admin: all; a tenant: its own)."""
    from kem.versions import versions_for

    groups = []
    with versions_for(settings) as vs:
        names = vs.tenants() if p.admin else [t for t in vs.tenants() if t == p.namespace]
        stores = ([("shared", vs)] if p.admin else []) + [(t, vs.of(t)) for t in names]
        for label, store in stores:
            current = store.current()
            rows = [{"version": m.version, "method": m.method, "parent": m.parent, "created_at": m.created_at,
                     "edits": len(m.edit_ids), "kept": len(m.failed_edit_ids), "metrics": m.metrics,
                     "current": m.version == current} for m in store.list()]
            groups.append({"group": label, "current": current or "base", "versions": rows})
    return groups


def _manifest(settings: Settings, namespace: str | None, version: str) -> dict[str, Any]:
    from kem.versions import versions_for

    with versions_for(settings, namespace) as vs:
        m = vs.manifest(version)
        current = vs.current()
    data = m.model_dump(mode="json")
    data["current"] = current == version
    data.setdefault("edits", [])
    return data


def _eval_dir(settings: Settings) -> Path:
    return Path(settings.home) / "eval"


def _eval_runs(settings: Settings) -> list[dict[str, Any]]:
    """The ``kem eval`` runs under ``KEM_HOME/eval`` (newest first), with their summaries."""
    root = _eval_dir(settings)
    runs = []
    for path in sorted(root.glob("*/results.json"), key=lambda f: f.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        cfg = data.get("config", {})
        runs.append({"name": path.parent.name, "dataset": cfg.get("dataset"), "mode": cfg.get("mode"), "n": cfg.get("n"),
                     "methods": cfg.get("methods", []), "summary": data.get("summary", {}),
                     "wall_s": data.get("wall_s")})
    return runs


SUMMARY_ROWS = [("generation.reliability", "reliability"), ("generation.generalization", "generalization"),
                ("generation.portability", "portability"), ("generation.locality", "locality (unchanged)"),
                ("easyedit.reliability", "EasyEdit reliability"), ("easyedit.generalization", "EasyEdit generalization"),
                ("easyedit.locality", "EasyEdit locality"), ("counterfact.score", "CounterFact score"),
                ("scope.precision", "scope precision"), ("scope.recall", "scope recall")]


def _eval_run(settings: Settings, run: str) -> dict[str, Any]:
    """One run: its summary table, plots and the misses per case (a probe answered wrong)."""
    path = _eval_dir(settings) / run / "results.json"
    if not _plain(run) or not path.is_file():
        raise NotFoundError(f"no evaluation run {run!r}")
    data = json.loads(path.read_text(encoding="utf-8"))
    methods = list(data.get("summary", {}))
    rows = [(label, [data["summary"][m].get(key) for m in methods]) for key, label in SUMMARY_ROWS
            if any(data["summary"][m].get(key) is not None for m in methods)]
    misses = []
    for method, cases in data.get("cases", {}).items():
        for case in cases:
            for probe in case.get("probes", []):
                ok = probe.get("unchanged") if probe.get("kind") == "locality" else probe.get("contains")
                if ok is False:
                    misses.append({"method": method, "case": case.get("case_id"), "kind": probe.get("kind"),
                                   "prompt": probe.get("prompt"), "expected": probe.get("expected"),
                                   "generated": probe.get("generated"), "before": probe.get("pre_generated")})
    plots = [p.stem for p in sorted((path.parent).glob("*.png"))]
    return {"config": data.get("config", {}), "methods": methods, "rows": rows, "misses": misses[:500],
            "n_misses": len(misses), "plots": plots, "wall_s": data.get("wall_s"), "skipped": data.get("skipped", [])}


__all__ = ["build_console", "COOKIE", "CSP"]
