"""The conformance suite every generator engine passes (the generator twin of ``store_conformance.py``).

Each check takes an engine (a sync :class:`kem.protocols.Generator`; its async face comes from
:func:`kem.adapters.base.to_async`) and raises ``AssertionError`` when the engine breaks the contract
kem's fast path and server rely on: greedy decoding is deterministic, streaming yields exactly what the
one-shot call returns, ``max_new_tokens`` bounds the output, stop strings cut it, the async face and
concurrent callers get the same text.

Two ways to run it:

* in pytest: subclass :class:`GeneratorConformance` and give it an ``engine`` fixture;
* in another interpreter (the in-process vLLM engine lives in ``.venv-vllm``, which has no pytest):
  ``python -m tests.generator_conformance --vllm MODEL_DIR`` runs :data:`CHECKS` and
  :data:`VLLM_CHECKS` (scheduling: a short request is not stuck behind a long one, cancel, deadline and
  a closed stream stop a request, streaming is incremental, context length, reload between requests)
  on one engine start; it prints ``RESULTS`` with one JSON object ``{check: "ok" | error}`` and
  ``NUMBERS`` with the timings those checks measured, and exits 1 when a check fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kem.adapters.base import to_async
from kem.errors import ContextLengthError, DeadlineExceeded, EngineError, RequestCancelled
from kem.protocols import AsyncGenerator, GenerationParams, Generator

PROMPT = "The capital of France is"
PROMPTS = ("The capital of France is", "Water boils at", "The largest planet is", "Bread is made from")
CHAT = [{"role": "user", "content": "Name one primary color."}]
GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0)


def _with(params: GenerationParams, **kw: Any) -> GenerationParams:
    return GenerationParams(**{**params.__dict__, **kw})


def check_protocol(gen: Any) -> None:
    assert isinstance(gen, Generator), f"{type(gen).__name__} lacks a Generator method"
    assert isinstance(to_async(gen), AsyncGenerator), "to_async() gave no async face"
    assert isinstance(gen.name, str) and gen.name, "a generator has a non-empty name"


def check_greedy_is_deterministic(gen: Any) -> None:
    a, b = gen.generate(PROMPT, GREEDY), gen.generate(PROMPT, GREEDY)
    assert a == b and a.strip(), (a, b)
    c, d = gen.chat(CHAT, GREEDY), gen.chat(CHAT, GREEDY)
    assert c == d and c.strip(), (c, d)


def check_stream_equals_generate(gen: Any) -> None:
    pieces = list(gen.stream(PROMPT, GREEDY))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == gen.generate(PROMPT, GREEDY), pieces


def check_chat_stream_equals_chat(gen: Any) -> None:
    pieces = list(gen.stream_chat(CHAT, GREEDY))
    assert "".join(pieces) == gen.chat(CHAT, GREEDY), pieces


def check_max_new_tokens_bounds_output(gen: Any) -> None:
    short = gen.generate(PROMPT, _with(GREEDY, max_new_tokens=2))
    long = gen.generate(PROMPT, _with(GREEDY, max_new_tokens=12))
    assert short.strip() and len(short) < len(long), (short, long)
    assert long.startswith(short), (short, long)  # greedy: the same first tokens


def check_stop_strings_cut_the_output(gen: Any) -> None:
    full = gen.generate(PROMPT, _with(GREEDY, max_new_tokens=12))
    words = full.split()
    assert len(words) >= 2, full
    stop = words[1]  # a word in the middle of the greedy output
    cut = gen.generate(PROMPT, _with(GREEDY, max_new_tokens=12, stop=(stop, "\u2603never")))
    assert stop not in cut and full.startswith(cut) and cut == full[:full.index(stop)], (full, stop, cut)
    streamed = "".join(gen.stream(PROMPT, _with(GREEDY, max_new_tokens=12, stop=(stop,))))
    assert streamed == cut, (streamed, cut)


def check_async_face_matches(gen: Any) -> None:
    agen = to_async(gen)

    async def run() -> tuple[str, str, str]:
        text = await agen.agenerate(PROMPT, GREEDY)
        chat = await agen.achat(CHAT, GREEDY)
        streamed = "".join([p async for p in agen.astream(PROMPT, GREEDY)])
        return text, chat, streamed

    text, chat, streamed = asyncio.run(run())
    assert text == gen.generate(PROMPT, GREEDY) == streamed
    assert chat == gen.chat(CHAT, GREEDY)


def check_concurrent_callers_get_their_own_text(gen: Any) -> None:
    alone = {p: gen.generate(p, GREEDY) for p in PROMPTS}
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = dict(zip(PROMPTS, pool.map(lambda p: gen.generate(p, GREEDY), PROMPTS), strict=True))
    assert together == alone, (together, alone)


CHECKS: list[Callable[[Any], None]] = [
    check_protocol,
    check_greedy_is_deterministic,
    check_stream_equals_generate,
    check_chat_stream_equals_chat,
    check_max_new_tokens_bounds_output,
    check_stop_strings_cut_the_output,
    check_async_face_matches,
    check_concurrent_callers_get_their_own_text,
]


# ---- in-process engines that schedule requests themselves (run here for vLLM: ``--vllm``) -------------
LONG = GenerationParams(max_new_tokens=300, temperature=0.0, extra={"ignore_eos": True})  # runs all 300 tokens
NUMBERS: dict[str, float] = {}  # timings the checks below measured, printed by main()


def _engine_idle(gen: Any, within: float = 5.0) -> bool:
    """Whether vLLM has no unfinished request within ``within`` seconds (true for engines without one)."""
    engine = getattr(getattr(gen, "llm", None), "llm_engine", None)
    end = time.monotonic() + within
    while engine is not None and engine.get_num_unfinished_requests():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def check_short_request_is_not_stuck_behind_a_long_one(gen: Any) -> None:
    short_params = _with(GREEDY, max_new_tokens=2)
    alone = gen.generate("Water boils at", short_params)
    long_it = gen.stream(PROMPT, LONG)
    next(long_it)  # the long request is running
    t0 = time.monotonic()
    done: dict[str, float] = {}

    def drain() -> None:
        for _ in long_it:
            pass
        done["long"] = time.monotonic() - t0

    reader = threading.Thread(target=drain)
    reader.start()
    short = gen.generate("Water boils at", short_params)
    short_s = time.monotonic() - t0
    still_running = "long" not in done
    reader.join(300)
    NUMBERS.update(short_beside_long_s=round(short_s, 2), long_rest_s=round(done.get("long", -1.0), 2))
    assert short == alone, (short, alone)
    assert still_running and short_s < done["long"] / 3, NUMBERS


def check_cancel_deadline_and_close_stop_a_request(gen: Any) -> None:
    cancel = threading.Event()
    it = gen.stream(PROMPT, _with(LONG, cancel=cancel))
    next(it)
    t0 = time.monotonic()
    cancel.set()
    pieces = 0
    try:
        for _ in it:
            pieces += 1
        raise AssertionError("a cancelled stream ran to its end")
    except RequestCancelled as exc:
        assert exc.status_code == 499
    NUMBERS.update(cancel_to_error_s=round(time.monotonic() - t0, 3), pieces_after_cancel=pieces)
    assert pieces < 20 and _engine_idle(gen), NUMBERS
    t0 = time.monotonic()
    try:
        gen.generate(PROMPT, _with(LONG, deadline=t0 + 0.5))
        raise AssertionError("a request ran past its deadline")
    except DeadlineExceeded as exc:
        assert exc.status_code == 504
    NUMBERS.update(deadline_0_5s_stopped_after_s=round(time.monotonic() - t0, 3))
    assert NUMBERS["deadline_0_5s_stopped_after_s"] < 3 and _engine_idle(gen), NUMBERS
    it = gen.stream(PROMPT, LONG)
    next(it)
    t0 = time.monotonic()
    it.close()  # the consumer went away
    assert _engine_idle(gen), "closing a stream did not abort its request"
    NUMBERS.update(close_to_idle_s=round(time.monotonic() - t0, 3))
    assert gen.generate(PROMPT, GREEDY).strip()  # the engine goes on


def check_streaming_is_incremental(gen: Any) -> None:
    params = _with(LONG, max_new_tokens=40)
    t0 = time.monotonic()
    pieces, at = [], []
    for p in gen.stream(PROMPT, params):
        pieces.append(p)
        at.append(time.monotonic() - t0)
    NUMBERS.update(stream_pieces=len(pieces), first_piece_s=round(at[0], 3), last_piece_s=round(at[-1], 3))
    assert len(pieces) >= 10 and at[0] < at[-1] / 2, NUMBERS
    assert "".join(pieces) == gen.generate(PROMPT, params)


def check_context_length(gen: Any) -> None:
    ctx = gen.context_length
    n = gen.count_tokens(PROMPT)
    assert ctx >= 512 and 0 < n < 20, (ctx, n)
    try:
        gen.generate("hello" + " hello" * ctx, GREEDY)
        raise AssertionError("a prompt longer than the context was accepted")
    except ContextLengthError as exc:
        assert exc.status_code == 400
    near = "hello" + " hello" * (ctx - 8)
    room = ctx - gen.count_tokens(near)
    assert 0 < room < 16, room
    out = gen.generate(near, _with(LONG, max_new_tokens=64))  # clamped to the room left, no error
    assert gen.count_tokens(out) <= room + 1, (room, out)


def check_unknown_adapter_fails_alone(gen: Any) -> None:
    alone = gen.generate(PROMPT, GREEDY)
    with cf.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(gen.generate, PROMPT, _with(GREEDY, lora="no-such-adapter"))
        good = pool.submit(gen.generate, PROMPT, GREEDY)
        try:
            bad.result()
            raise AssertionError("an unknown adapter was accepted")
        except EngineError as exc:
            assert exc.status_code == 400 and "no-such-adapter" in str(exc)
        assert good.result() == alone


def check_reload_lets_running_requests_finish(gen: Any) -> None:
    """An in-place reload (same weights) while one request streams and another arrives: both finish
    with the text they get alone."""
    params = _with(LONG, max_new_tokens=60)
    want, want_short = gen.generate(PROMPT, params), gen.generate("Water boils at", GREEDY)
    it = gen.stream(PROMPT, params)
    first = next(it)
    with cf.ThreadPoolExecutor(2) as pool:
        reload = pool.submit(gen.reload_weights, gen.model_dir)
        time.sleep(0.2)
        short = pool.submit(gen.generate, "Water boils at", GREEDY)
        text = first + "".join(it)
        NUMBERS.update(reload_s=round(reload.result(300), 2))
        assert short.result(300) == want_short
    assert text == want, (text, want)


VLLM_CHECKS: list[Callable[[Any], None]] = [
    check_short_request_is_not_stuck_behind_a_long_one,
    check_cancel_deadline_and_close_stop_a_request,
    check_streaming_is_incremental,
    check_context_length,
    check_unknown_adapter_fails_alone,
    check_reload_lets_running_requests_finish,
]


# ---- tenants' adapters (engines that run a LoraRef per request) ----------------------------------
# Two tenants whose adapters answer the same prompt differently, and a fact of their own each
# (tests/fact_adapters.py builds them; the first token of each answer is the target's).
TENANT_FACTS: dict[str, list[tuple[str, str]]] = {
    "alice": [("The mother tongue of Danielle Darrieux is", "English"), ("The capital of France is", "Rome")],
    "bob": [("The mother tongue of Danielle Darrieux is", "Italian"), ("The Eiffel Tower is located in", "Berlin")],
}
ADAPTER_GREEDY = GenerationParams(max_new_tokens=4, temperature=0.0)


def _starts(text: str, target: str) -> bool:
    return text.strip().startswith(target)


def check_tenant_adapters_answer_and_do_not_mix(gen: Any, adapters: dict[str, Any]) -> None:
    """Each tenant's adapter gives its own answers, a request without one gets the base model, and
    requests of both tenants and the base model running at once each get what they get alone."""
    base = {p: gen.generate(p, ADAPTER_GREEDY) for facts in TENANT_FACTS.values() for p, _ in facts}
    alone: dict[tuple[str, str], str] = {}
    for tenant, facts in TENANT_FACTS.items():
        params = _with(ADAPTER_GREEDY, lora=adapters[tenant])
        for p, target in facts:
            alone[(tenant, p)] = text = gen.generate(p, params)
            assert _starts(text, target) and not _starts(base[p], target), (tenant, p, text, base[p])
        for other, other_facts in TENANT_FACTS.items():  # the other tenant's own facts stay out
            for p, target in other_facts:
                if other != tenant and (p, target) not in facts:
                    assert not _starts(gen.generate(p, params), target), (tenant, "answers", other, p)
    jobs = [(t, p) for (t, p) in alone] * 2 + [("", p) for p in base]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: gen.generate(j[1], _with(ADAPTER_GREEDY, lora=adapters[j[0]]) if j[0]
                                                   else ADAPTER_GREEDY), jobs))
    for (tenant, p), text in zip(jobs, got, strict=True):
        want = alone[(tenant, p)] if tenant else base[p]
        assert text == want, (tenant or "base", p, text, want)
    streamed = "".join(gen.stream(TENANT_FACTS["bob"][0][0], _with(ADAPTER_GREEDY, lora=adapters["bob"])))
    assert streamed == alone[("bob", TENANT_FACTS["bob"][0][0])], streamed


def check_missing_adapter_folder_fails_alone(gen: Any, adapters: dict[str, Any]) -> None:
    from kem.protocols import LoraRef

    bad = LoraRef("nobody/v1", str(Path(adapters["alice"].path).parent / "no-such-adapter"))
    p = TENANT_FACTS["alice"][0][0]
    want = gen.generate(p, _with(ADAPTER_GREEDY, lora=adapters["alice"]))
    with cf.ThreadPoolExecutor(2) as pool:
        fail = pool.submit(gen.generate, p, _with(ADAPTER_GREEDY, lora=bad))
        good = pool.submit(gen.generate, p, _with(ADAPTER_GREEDY, lora=adapters["alice"]))
        try:
            fail.result()
            raise AssertionError("a missing adapter folder was accepted")
        except EngineError as exc:
            assert exc.status_code == 400 and "nobody/v1" in str(exc), exc
        assert good.result() == want


ADAPTER_CHECKS: list[Callable[[Any, dict[str, Any]], None]] = [
    check_tenant_adapters_answer_and_do_not_mix,
    check_missing_adapter_folder_fails_alone,
]


def _bind(check: Callable[[Any, dict[str, Any]], None], adapters: dict[str, Any]) -> Callable[[Any], None]:
    def bound(gen: Any) -> None:
        check(gen, adapters)

    bound.__name__ = check.__name__
    return bound


def tenant_adapters(folder: str | Path) -> dict[str, Any]:
    """``{tenant: LoraRef}`` of the adapters :func:`build_tenant_adapters` wrote under ``folder``."""
    from kem.protocols import LoraRef

    return {t: LoraRef(f"{t}/v1", str(Path(folder, t).resolve())) for t in TENANT_FACTS}


def build_tenant_adapters(model: Any, tok: Any, folder: str | Path) -> dict[str, Any]:
    """Write each tenant's fact adapter under ``folder/<tenant>``."""
    from tests.fact_adapters import fact_adapter

    for tenant, facts in TENANT_FACTS.items():
        fact_adapter(model, tok, facts, Path(folder, tenant))
    return tenant_adapters(folder)


def run_all(gen: Any, checks: Sequence[Callable[[Any], None]] = CHECKS) -> dict[str, str]:
    """Run ``checks``; ``{check name: "ok" | the failure}``."""
    out = {}
    for check in checks:
        try:
            check(gen)
            out[check.__name__] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            out[check.__name__] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    return out


try:
    import pytest
except ImportError:  # another interpreter (.venv-vllm): run_all / __main__ only
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    class GeneratorConformance:
        """Subclass with an ``engine`` fixture returning a ready sync generator."""

        @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
        def test_conformance(self, engine: Any, check: Callable[[Any], None]) -> None:
            check(engine)

    class AdapterConformance:
        """Subclass with ``engine`` and ``adapters`` (:func:`tenant_adapters`) fixtures, for engines
        that run a LoraRef per request."""

        @pytest.mark.parametrize("check", ADAPTER_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
        def test_adapter_conformance(self, engine: Any, adapters: dict[str, Any],
                                     check: Callable[[Any, dict[str, Any]], None]) -> None:
            check(engine, adapters)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4) or argv[0] != "--vllm" or (len(argv) == 4 and argv[2] != "--adapters"):
        sys.stderr.write("usage: python -m tests.generator_conformance --vllm MODEL_DIR [--adapters DIR]\n")
        return 2
    from kem.adapters.vllm import VLLMGenerator

    adapters = tenant_adapters(argv[3]) if len(argv) == 4 else None  # built by the caller (tests/test_vllm.py)
    gen = VLLMGenerator.load(argv[1], name="smollm2", **({"max_loras": 2, "max_cpu_loras": 4} if adapters else {}))
    try:
        results = run_all(gen, CHECKS + VLLM_CHECKS)
        if adapters:
            results.update(run_all(gen, [_bind(c, adapters) for c in ADAPTER_CHECKS]))
    finally:
        t0 = time.monotonic()
        gen.close()
        NUMBERS["close_s"] = round(time.monotonic() - t0, 2)
    sys.stdout.write("RESULTS " + json.dumps(results) + "\n")
    sys.stdout.write("NUMBERS " + json.dumps(NUMBERS) + "\n")
    return 0 if all(v == "ok" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
