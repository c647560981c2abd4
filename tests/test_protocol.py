"""The OpenAI wire models reject bad requests with a 400 naming the field, and never fail otherwise."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kem.errors import ContextLengthError, ValidationError
from kem.server.protocol import (
    GREEDY_BELOW,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOKENS_CAP,
    ChatCompletionRequest,
    CompletionRequest,
    clamp_max_tokens,
    kem_error_body,
    parse_request,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"prompt": "The capital of France is"}


def parse(model: type, body: Any) -> Any:
    return parse_request(model, json.dumps(body))


def rejects(model: type, body: Any, field: str) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse(model, body)
    err = info.value
    assert err.status_code == 400 and err.field == field, (str(err), err.field)
    out = kem_error_body(err)["error"]
    assert out["param"] == field and out["type"] == "invalid_request_error" and field in out["message"]
    return err


# ---- each rule, before it was there: accepted (or a 5xx later in the engine) ----------------------------
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, 2**64, MAX_TOKENS_CAP + 1, 1.5, "many"])
def test_max_tokens_bounds(field: str, value: Any) -> None:
    rejects(ChatCompletionRequest, {**CHAT, field: value}, field)


def test_max_tokens_in_bounds() -> None:
    req = parse(ChatCompletionRequest, {**CHAT, "max_tokens": 1, "max_completion_tokens": MAX_TOKENS_CAP})
    assert req.token_limit() == MAX_TOKENS_CAP
    assert parse(CompletionRequest, {**COMPLETION, "max_tokens": 7}).token_limit() == 7


@pytest.mark.parametrize("stop", [
    ["a", "b", "c", "d", "e"], [""], "", ["ok", ""], "x" * (MAX_STOP_CHARS + 1), [1], {"a": 1},
])
def test_stop_rules(stop: Any) -> None:
    rejects(CompletionRequest, {**COMPLETION, "stop": stop}, "stop")


@pytest.mark.parametrize("stop", [None, [], "\n", ["a", "b", "c", "d"], "x" * MAX_STOP_CHARS])
def test_stop_accepted(stop: Any) -> None:
    req = parse(CompletionRequest, {**COMPLETION, "stop": stop})
    assert len(req.stop_list()) <= MAX_STOP and all(req.stop_list())


@pytest.mark.parametrize("value", [-0.1, 2.0001, 1e308 * 10, "hot"])
def test_temperature_range(value: Any) -> None:
    rejects(CompletionRequest, {**COMPLETION, "temperature": value}, "temperature")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats(value: float) -> None:
    for field in ("temperature", "top_p"):
        rejects(CompletionRequest, {**COMPLETION, field: value}, field)  # json.dumps writes NaN / Infinity
        with pytest.raises(ValidationError):
            parse_request(CompletionRequest, json.dumps({**COMPLETION, field: str(value)}))


@pytest.mark.parametrize("value", [1e-300, 5e-324, 1e-6, GREEDY_BELOW / 2])
def test_tiny_temperature_means_greedy(value: float) -> None:
    """Regression: 1e-300 reached the engine, which divided the logits by it (inf, NaN) and answered 5xx.
    Below GREEDY_BELOW a temperature is read as 0: greedy, as vLLM does."""
    assert parse(CompletionRequest, {**COMPLETION, "temperature": value}).temperature == 0.0


@pytest.mark.parametrize("value", [0, 0.0, GREEDY_BELOW, 0.7, 2])
def test_temperature_kept(value: float) -> None:
    assert parse(CompletionRequest, {**COMPLETION, "temperature": value}).temperature == value


@pytest.mark.parametrize("value", [0, -0.5, 1.01])
def test_top_p_range(value: float) -> None:
    rejects(CompletionRequest, {**COMPLETION, "top_p": value}, "top_p")


@pytest.mark.parametrize("value", [1e-300, 0.5, 1])
def test_top_p_kept(value: float) -> None:
    assert parse(CompletionRequest, {**COMPLETION, "top_p": value}).top_p == value


@pytest.mark.parametrize("prompt", ["", [""], [], ["ok", ""], None, 5])
def test_empty_prompt(prompt: Any) -> None:
    rejects(CompletionRequest, {"prompt": prompt}, "prompt")


def test_prompt_missing() -> None:
    rejects(CompletionRequest, {}, "prompt")


def test_prompt_list_of_many_is_one_request_each() -> None:
    req = parse(CompletionRequest, {"prompt": ["a", "b"]})
    with pytest.raises(ValidationError) as info:
        req.prompt_text()
    assert info.value.field == "prompt"
    assert parse(CompletionRequest, {"prompt": ["a"]}).prompt_text() == "a"


@pytest.mark.parametrize("messages,field", [
    ([], "messages"),
    (None, "messages"),
    ("hi", "messages"),
    ([{"content": "hi"}], "messages.0"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "messages.1"),
    ([{"role": "user", "content": 5}], "messages.0"),
    ([{"role": ["user"], "content": "x"}], "messages.0"),
    (["hi"], "messages.0"),
])
def test_bad_messages(messages: Any, field: str) -> None:
    rejects(ChatCompletionRequest, {"messages": messages}, field)


def test_message_forms_openai_sends() -> None:
    req = parse(ChatCompletionRequest, {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "42", "tool_call_id": "t1"},
    ]})
    assert len(req.messages) == 4 and req.messages[2]["tool_calls"] == []


@pytest.mark.parametrize("n", [0, -1, 129])
def test_n_bounds(n: int) -> None:
    rejects(CompletionRequest, {**COMPLETION, "n": n}, "n")


def test_n_other_than_one_is_refused_where_one_choice_is_served() -> None:
    parse(CompletionRequest, {**COMPLETION, "n": 1}).single_choice()
    parse(CompletionRequest, COMPLETION).single_choice()
    req = parse(ChatCompletionRequest, {**CHAT, "n": 3})  # upstream engines may serve it: parsing accepts
    with pytest.raises(ValidationError) as info:
        req.single_choice()
    assert info.value.field == "n" and "n=3" in str(info.value)


def test_sampling_fields_are_checked_and_unknown_ones_refused() -> None:
    req = parse(CompletionRequest, {**COMPLETION, "seed": 3, "top_k": 40, "min_p": 0.1, "stream_options": {"include_usage": True},
                                    "logit_bias": {"50256": -100}, "echo": False})
    assert req.engine_extra() == {"seed": 3, "top_k": 40, "min_p": 0.1, "logit_bias": {"50256": -100.0}}
    assert req.include_usage()
    chat = parse(ChatCompletionRequest, {**CHAT, "tools": [], "tool_choice": "auto", "response_format": {"type": "json_object"},
                                         "logprobs": True, "top_logprobs": 3})
    assert chat.engine_extra() == {}
    bad = [({"frobnicate": 1}, "frobnicate"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
           ({"presence_penalty": 2.5}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
           ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
           ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
           ({"stream_options": {"extra": True}}, "stream_options.extra"), ({"seed": 2**64}, "seed"),
           ({"ignore_eos": "sometimes"}, "ignore_eos"), ({"user": "u" * 300}, "user")]
    for extra, field in bad:
        with pytest.raises(ValidationError) as info:
            parse(CompletionRequest, {**COMPLETION, **extra})
        assert info.value.field == field, (extra, info.value.field)
    for extra, field in [({"response_format": {"type": "yaml"}}, "response_format.type"),
                         ({"top_logprobs": 21}, "top_logprobs"), ({"tool_choice": "sometimes"}, "tool_choice"),
                         ({"messages": [{"role": "user", "content": "hi", "secret": 1}]}, "messages.0")]:
        with pytest.raises(ValidationError) as info:
            parse(ChatCompletionRequest, {**CHAT, **extra})
        assert info.value.field == field, (extra, info.value.field)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'"prompt"', b'{"prompt": "a",}'])
def test_not_an_object(raw: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        parse_request(CompletionRequest, raw)
    assert kem_error_body(info.value)["error"]["param"] is None  # the body as a whole, not a field


# ---- clamp_max_tokens -----------------------------------------------------------------------------------
def test_clamp_max_tokens() -> None:
    assert clamp_max_tokens(100, 50, 2048, 4096) == 100
    assert clamp_max_tokens(1998, 50, 2048, 4096) == 1998  # exactly fills the context
    assert clamp_max_tokens(None, 50, 2048, 4096, default=32) == 32
    assert clamp_max_tokens(None, 2000, 2048, 4096, default=64) == 48  # the default is cut to what fits
    assert clamp_max_tokens(None, 50, 2048, 512) == 512  # no default: the ceiling


def test_clamp_context_exceeded() -> None:
    with pytest.raises(ContextLengthError) as info:
        clamp_max_tokens(1999, 50, 2048, 4096)
    err = info.value
    assert (err.status_code, err.code, err.field) == (400, "context_length_exceeded", "max_tokens")
    assert "2049 tokens (50 in the messages, 1999 in the completion)" in str(err)
    body = kem_error_body(err)["error"]
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    assert body["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt_tokens", [2048, 5000])
def test_clamp_prompt_fills_context(prompt_tokens: int) -> None:
    for requested in (None, 1):
        with pytest.raises(ContextLengthError) as info:
            clamp_max_tokens(requested, prompt_tokens, 2048, 4096, prompt_field="prompt")
        assert info.value.field == "prompt"


@pytest.mark.parametrize("requested", [0, 4097, 2**64])
def test_clamp_above_ceiling(requested: int) -> None:
    with pytest.raises(ValidationError) as info:
        clamp_max_tokens(requested, 10, 10**9, 4096, field="max_completion_tokens")
    assert info.value.field == "max_completion_tokens" and "4096" in str(info.value)
    assert not isinstance(info.value, ContextLengthError)


@given(requested=st.none() | st.integers(-5, 10**7), prompt=st.integers(0, 10**5),
       context=st.integers(1, 10**5), ceiling=st.integers(1, 10**6), default=st.none() | st.integers(1, 10**4))
def test_clamp_property(requested: int | None, prompt: int, context: int, ceiling: int, default: int | None) -> None:
    try:
        n = clamp_max_tokens(requested, prompt, context, ceiling, default=default)
    except ValidationError:
        return
    assert 1 <= n <= ceiling and prompt + n <= context
    assert requested is None or n == requested


# ---- property: any JSON parses or is a kem ValidationError --------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream", "n",
          "user", "stream_options", "prompt", "messages", "seed"]
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]),
                                    st.sampled_from(["user", "assistant", "system", "robot", ""]) | json_values,
                                    max_size=4), max_size=3)
field_values = (json_values | st.integers(-(2**70), 2**70) | st.floats(-1e-3, 3) | messages
                | st.lists(st.text(max_size=300), max_size=6))
# mostly a valid request with a few fields replaced, so that the checks after parsing get exercised too
bodies = (st.builds(lambda base, over: {**base, **over}, st.sampled_from([CHAT, COMPLETION, {**CHAT, **COMPLETION}]),
                    st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=3))
          | st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=8)
          | json_values)


def check_parsed(req: Any) -> None:
    """What a parsed request guarantees to the serving code (and its helpers raise only ValidationError)."""
    limit = req.token_limit()
    assert limit is None or 1 <= limit <= MAX_TOKENS_CAP
    stops = req.stop_list()
    assert len(stops) <= MAX_STOP and all(0 < len(s) <= MAX_STOP_CHARS for s in stops)
    assert req.temperature is None or req.temperature == 0.0 or GREEDY_BELOW <= req.temperature <= 2
    assert req.top_p is None or (0 < req.top_p <= 1 and math.isfinite(req.top_p))
    assert isinstance(req.include_usage(), bool)
    for call in (req.single_choice, getattr(req, "prompt_text", lambda: None)):
        try:
            call()
        except ValidationError:
            pass
    if isinstance(req, ChatCompletionRequest):
        assert req.messages and all(isinstance(m.get("role"), str) for m in req.messages)
    else:
        assert req.prompt


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, allow_nan=st.booleans())
@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_any_json_parses_or_is_a_validation_error(model: type, body: Any, allow_nan: bool) -> None:
    try:
        raw = json.dumps(body, allow_nan=allow_nan)
    except ValueError:
        return
    try:
        req = parse_request(model, raw)
    except ValidationError as exc:
        assert exc.status_code == 400
        kem_error_body(exc)
        return
    check_parsed(req)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_parse_or_are_a_validation_error(raw: bytes) -> None:
    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            check_parsed(parse_request(model, raw))
        except ValidationError:
            pass
