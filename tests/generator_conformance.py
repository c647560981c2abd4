"""The conformance suite every generator engine passes (the generator twin of ``store_conformance.py``).

Each check takes an engine (a sync :class:`kem.protocols.Generator`; its async face comes from
:func:`kem.adapters.base.to_async`) and raises ``AssertionError`` when the engine breaks the contract
kem's fast path and server rely on: greedy decoding is deterministic, streaming yields exactly what the
one-shot call returns, ``max_new_tokens`` bounds the output, stop strings cut it, the async face and
concurrent callers get the same text.

Two ways to run it:

* in pytest: subclass :class:`GeneratorConformance` and give it an ``engine`` fixture;
* in another interpreter (the in-process vLLM engine lives in ``.venv-vllm``, which has no pytest):
  ``python -m tests.generator_conformance --vllm MODEL_DIR`` prints one JSON object
  ``{check: "ok" | error}`` and exits 1 when a check fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

from kem.adapters.base import to_async
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


def run_all(gen: Any) -> dict[str, str]:
    """Run every check; ``{check name: "ok" | the failure}``."""
    out = {}
    for check in CHECKS:
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


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--vllm":
        sys.stderr.write("usage: python -m tests.generator_conformance --vllm MODEL_DIR\n")
        return 2
    from kem.adapters.vllm import VLLMGenerator

    gen = VLLMGenerator.load(argv[1], name="smollm2")
    try:
        results = run_all(gen)
    finally:
        gen.close()
    sys.stdout.write("RESULTS " + json.dumps(results) + "\n")
    return 0 if all(v == "ok" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
