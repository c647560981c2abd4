"""The transformers engine under contention: requests interleave token by token (a long request cannot
hold the model while a short one waits), a cancelled or timed-out request stops between steps, an
abandoned stream holds nothing, and a prompt longer than the context is a clear 400."""

from __future__ import annotations

import threading
import time

import pytest

from kem.errors import ContextLengthError, DeadlineExceeded, RequestCancelled
from kem.protocols import GenerationParams


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


SHORT = GenerationParams(max_new_tokens=2)
PROMPT = "The capital of France is"
COUNT = "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy continues the count for hundreds of tokens


def test_a_short_request_is_not_stuck_behind_a_long_one(generator):
    t0 = time.perf_counter()
    generator.generate(PROMPT, SHORT)
    idle = time.perf_counter() - t0
    long_done: list[float] = []

    def long_request() -> None:
        generator.generate(COUNT, GenerationParams(max_new_tokens=150))
        long_done.append(time.perf_counter())

    th = threading.Thread(target=long_request)
    th.start()
    time.sleep(max(1.0, 5 * idle))  # the long request is decoding now
    t1 = time.perf_counter()
    assert generator.generate(PROMPT, SHORT) == generator.generate(PROMPT, SHORT)  # still exact
    short_done = time.perf_counter()
    still_running = th.is_alive()
    th.join()
    # before: one lock per request, the short one waited for all 150 tokens of the long one
    assert still_running and long_done and short_done < long_done[0], "the short request waited for the long one"
    assert short_done - t1 < 0.5 * (long_done[0] - t1)


def test_cancel_and_deadline_stop_between_steps(generator):
    cancel = threading.Event()
    it = generator.stream(COUNT, GenerationParams(max_new_tokens=500, cancel=cancel))
    first = next(it)
    assert first
    cancel.set()
    with pytest.raises(RequestCancelled):
        for _ in it:
            pass
    t0 = time.perf_counter()
    with pytest.raises(DeadlineExceeded) as exc:
        generator.generate(COUNT,
                           GenerationParams(max_new_tokens=2000, deadline=time.monotonic() + 0.5))
    assert exc.value.status_code == 504 and time.perf_counter() - t0 < 5


def test_an_abandoned_stream_holds_nothing(generator):
    it = generator.stream(COUNT, GenerationParams(max_new_tokens=200))
    next(it)  # the consumer stops reading here (a client that went away) and never closes it
    done = threading.Event()
    threading.Thread(target=lambda: (generator.generate(PROMPT, SHORT), done.set()), daemon=True).start()
    assert done.wait(60), "another request is blocked by a suspended stream"
    it.close()


def test_prompt_longer_than_the_context_is_a_400(generator):
    text = "word " * (generator.context_length + 10)
    with pytest.raises(ContextLengthError) as exc:
        generator.generate(text, SHORT)
    assert exc.value.status_code == 400 and exc.value.code == "context_length_exceeded"


def test_a_stream_resumed_on_another_thread_still_decodes(generator):
    """A server streams by calling ``next()`` from whichever worker thread is free. Grad modes are per
    thread, so a stream that entered inference mode around its yields decoded its next step without it
    (502: "Inference tensors cannot be saved for backward"), and leaked the mode into the first thread."""
    import torch

    params = GenerationParams(max_new_tokens=6, temperature=0.0)
    want = generator.generate("The Eiffel Tower is located in", params)
    it = generator.stream("The Eiffel Tower is located in", params)
    pieces: list[str] = []
    pieces.append(next(it))
    assert not torch.is_inference_mode_enabled()  # nothing leaks into the consumer's thread
    errors: list[BaseException] = []

    def rest() -> None:
        try:
            with torch.enable_grad():
                pieces.extend(it)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=rest)
    t.start()
    t.join(60)
    assert not errors, errors
    assert "".join(pieces) == want


def test_a_short_step_runs_beside_a_long_prefill_and_both_answers_stay_exact(generator):
    """The second lane (FairTurns.LONG / SHORT): while a long prompt prefills, short requests' steps run
    beside its chunks, on half the CPU threads each (two threads here: one each), and every answer is
    the one each request gets alone (greedy). Each thread gets its own count back afterwards."""
    import torch

    from kem.adapters.transformers import FairTurns

    long_prompt = " ".join(f"item {i}," for i in range(600)) + " The next item is"  # ~3,400 tokens
    params = GenerationParams(max_new_tokens=6)
    alone_long = generator.generate(long_prompt, params)
    alone_short = [generator.generate(p, SHORT) for p in (PROMPT, "The capital of Japan is")]
    seen: list[tuple[int, bool]] = []  # (steps running, ran beside another) per step
    threads: list[tuple[int, int]] = []  # (input tokens, torch threads) per model call
    long_enough = threading.Event()
    original = FairTurns.turn

    def watching(self, served=0, owner=None, shareable=False):  # records how many steps ran at once
        if served >= FairTurns.LONG:
            long_enough.set()
        with original(self, served, owner, shareable) as beside:
            seen.append((len(self._running), beside))
            yield beside

    import contextlib

    hook = generator.model.register_forward_pre_hook(
        lambda _m, args, kwargs: threads.append((kwargs["input_ids"].shape[1], torch.get_num_threads())),
        with_kwargs=True)
    FairTurns.turn = contextlib.contextmanager(watching)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out: dict[str, int | str] = {}

        def long_request() -> None:
            torch.set_num_threads(2)
            out["long"] = generator.generate(long_prompt, params)
            out["after"] = torch.get_num_threads()

        th = threading.Thread(target=long_request)
        th.start()
        assert long_enough.wait(120)  # the long prompt's prefill is past FairTurns.LONG tokens
        shorts = [generator.generate(p, SHORT) for p in (PROMPT, "The capital of Japan is") for _ in range(3)]
        after_short = torch.get_num_threads()
        th.join()
    finally:
        FairTurns.turn = original
        hook.remove()
        torch.set_num_threads(before)
    assert out["long"] == alone_long
    assert shorts == [alone_short[0]] * 3 + [alone_short[1]] * 3
    assert max(n for n, _ in seen) == 2, "no short step ran beside the long prefill"
    assert all(beside == (n == 2) for n, beside in seen), seen
    # the long prefill's chunks ran on one thread while the shorts were in flight; a step alone on two
    assert 1 in {t for n, t in threads if n == type(generator).PREFILL_CHUNK_CONTENDED}, threads
    assert 2 in {t for _, t in threads}, threads
    assert out["after"] == 2 and after_short == 2  # each thread's own count is back


def test_a_thread_first_seen_while_a_step_is_halved_starts_from_the_full_count(generator):
    """A step on half its threads lowers torch's global value for its duration, which a thread's first
    torch call copies; the engine gives such a thread the last count read while none was halved."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: dict[str, int] = {}
    try:
        with generator._step_threads(False, long_step=False):  # a clean reading: 2
            pass
        with generator._step_threads(True, long_step=False):  # beside another step
            seen["halved"] = torch.get_num_threads()

            def fresh() -> None:
                with generator._step_threads(False, long_step=False):
                    seen["fresh"] = torch.get_num_threads()

            th = threading.Thread(target=fresh)
            th.start()
            th.join()
        seen["after"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == {"halved": 1, "fresh": 2, "after": 2}
