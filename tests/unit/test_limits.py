"""Input bounds: hostile or broken bodies get a 400 (413 when too big) naming the parameter;
the request shapes OpenAI clients and vLLM accept all pass."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.guards.limits import (
    InputError,
    RequestLimits,
    check_body_size,
    check_headers,
    check_request,
    decode_body,
)

LIMITS = RequestLimits(max_top_logprobs=20)
MAX_MODEL_LEN = 32_768
PNG = "data:image/png;base64,iVBORw0KGgo="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Hello"}], **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "Once upon a time", **fields}


def user(content: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": content}])


def huge_schema(nbytes: int) -> dict[str, Any]:
    return {"type": "object", "description": "x" * nbytes}


BAD: list[Any] = [
    # (route, payload, param)
    pytest.param("chat", [{"role": "user", "content": "hi"}], None, id="payload-a-list"),
    pytest.param("chat", "hello", None, id="payload-a-string"),
    pytest.param("completion", None, None, id="payload-null"),
    # n / best_of
    pytest.param("chat", chat(n=1000), "n", id="huge-n"),
    pytest.param("chat", chat(n=0), "n", id="n-zero"),
    pytest.param("chat", chat(n=-3), "n", id="n-negative"),
    pytest.param("chat", chat(n="2"), "n", id="n-a-string"),
    pytest.param("chat", chat(n=True), "n", id="n-a-bool"),
    pytest.param("chat", chat(n=1.5), "n", id="n-a-fraction"),
    pytest.param("completion", completion(best_of=50), "best_of", id="huge-best_of"),
    # max_tokens
    pytest.param("chat", chat(max_tokens=-1), "max_tokens", id="max_tokens-negative"),
    pytest.param("chat", chat(max_tokens=0), "max_tokens", id="max_tokens-zero"),
    pytest.param("chat", chat(max_tokens=10**30), "max_tokens", id="max_tokens-enormous"),
    pytest.param("chat", chat(max_tokens=MAX_MODEL_LEN + 1), "max_tokens", id="max_tokens-over-context"),
    pytest.param("chat", chat(max_tokens=True), "max_tokens", id="max_tokens-a-bool"),
    pytest.param("chat", chat(max_tokens="100"), "max_tokens", id="max_tokens-a-string"),
    pytest.param("chat", chat(max_tokens=float("inf")), "max_tokens", id="max_tokens-infinite"),
    pytest.param(
        "chat",
        chat(max_completion_tokens=10**9),
        "max_completion_tokens",
        id="max_completion_tokens-over-context",
    ),
    pytest.param("completion", completion(max_tokens=0), "max_tokens", id="completion-max_tokens-0"),
    pytest.param("completion", completion(max_tokens=10**6), "max_tokens", id="completion-over-context"),
    # logprobs
    pytest.param("chat", chat(logprobs=True, top_logprobs=1000), "top_logprobs", id="top_logprobs-1000"),
    pytest.param("chat", chat(logprobs=True, top_logprobs=-5), "top_logprobs", id="top_logprobs-negative"),
    pytest.param("chat", chat(logprobs=5), "logprobs", id="chat-logprobs-an-int"),
    pytest.param("completion", completion(logprobs=100), "logprobs", id="completion-logprobs-100"),
    pytest.param("completion", completion(logprobs=True), "logprobs", id="completion-logprobs-a-bool"),
    pytest.param("chat", chat(seed=2**64), "seed", id="seed-over-int64"),
    pytest.param("chat", chat(seed="42"), "seed", id="seed-a-string"),
    # stop
    pytest.param("chat", chat(stop=[f"s{i}" for i in range(200)]), "stop", id="200-stop-strings"),
    pytest.param("chat", chat(stop="x" * 10_000), "stop", id="10kb-stop-string"),
    pytest.param("completion", completion(stop=["ok", "x" * 10_000]), "stop[1]", id="10kb-stop-in-list"),
    # tools
    pytest.param("chat", chat(tools=[WEATHER_TOOL] * 500), "tools", id="500-tools"),
    pytest.param(
        "chat",
        chat(tools=[WEATHER_TOOL, {"type": "function", "function": {"name": "get weather!"}}]),
        "tools[1].function.name",
        id="tool-bad-name",
    ),
    pytest.param(
        "chat",
        chat(tools=[{"type": "function", "function": {"name": "f" * 65}}]),
        "tools[0].function.name",
        id="tool-name-too-long",
    ),
    pytest.param(
        "chat",
        chat(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "tools[0].function.name",
        id="tool-name-missing",
    ),
    pytest.param(
        "chat",
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": huge_schema(70_000)}}]),
        "tools[0]",
        id="tool-huge-schema",
    ),
    # response_format
    pytest.param(
        "chat",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": huge_schema(70_000)},
            }
        ),
        "response_format.json_schema",
        id="json_schema-huge",
    ),
    # messages
    pytest.param("chat", chat(messages=[]), "messages", id="messages-empty"),
    pytest.param("chat", chat(messages="hello"), "messages", id="messages-a-string"),
    pytest.param("chat", {"model": "m", "prompt": "hi"}, "messages", id="messages-missing"),
    pytest.param(
        "chat",
        chat(messages=[{"role": "user", "content": "hi"}] * 10_000),
        "messages",
        id="10000-messages",
    ),
    pytest.param(
        "chat",
        chat(messages=[{"role": "user", "content": "a"}] * 3 + [{"role": "wizard", "content": "b"}]),
        "messages[3].role",
        id="role-wizard",
    ),
    pytest.param("chat", chat(messages=[{"content": "hi"}]), "messages[0].role", id="role-missing"),
    pytest.param("chat", chat(messages=[{"role": 1, "content": "hi"}]), "messages[0].role", id="role-an-int"),
    pytest.param("chat", chat(messages=["hi"]), "messages[0]", id="message-a-string"),
    pytest.param("chat", user(42), "messages[0].content", id="content-an-int"),
    pytest.param("chat", user({"type": "text", "text": "hi"}), "messages[0].content", id="content-an-object"),
    pytest.param("chat", user([{"text": "hi"}]), "messages[0].content[0].type", id="part-without-type"),
    pytest.param(
        "chat", user([{"type": 3, "text": "hi"}]), "messages[0].content[0].type", id="part-type-int"
    ),
    pytest.param("chat", user([1, "hi"]), "messages[0].content[0]", id="part-an-int"),
    pytest.param(
        "chat", user(["x" * 300_000, "y" * 300_000]), "messages[0].content", id="string-parts-too-long"
    ),
    pytest.param("chat", user("x" * 600_000), "messages[0].content", id="content-too-long"),
    pytest.param(
        "chat",
        user([{"type": "text", "text": "x" * 300_000}] * 2),
        "messages[0].content",
        id="parts-too-long-together",
    ),
    pytest.param(
        "chat",
        chat(messages=[{"role": "user", "content": "hi", "name": 5}]),
        "messages[0].name",
        id="name-an-int",
    ),
    # unicode
    pytest.param(
        "chat",
        json.loads('{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        "messages[0].content",
        id="lone-surrogate",
    ),
    pytest.param(
        "completion",
        json.loads('{"prompt": "ok", "stop": ["\\udfff"]}'),
        "stop[0]",
        id="lone-low-surrogate",
    ),
    pytest.param("chat", json.loads('{"\\ud83d": 1, "messages": []}'), "\\ud83d", id="lone-surrogate-in-key"),
    # prompts
    pytest.param("completion", completion(prompt=["p"] * 1000), "prompt", id="1000-prompts"),
    pytest.param("completion", completion(prompt=[[1, 2]] * 1000), "prompt", id="1000-token-prompts"),
    pytest.param("completion", completion(prompt=["a", 1]), "prompt[1]", id="prompt-mixed"),
    pytest.param("completion", completion(prompt=[1, -2, 3]), "prompt[1]", id="prompt-negative-token"),
    pytest.param("completion", completion(prompt=[1, "two"]), "prompt[1]", id="prompt-string-token"),
    pytest.param(
        "completion", completion(prompt=[[1, 2], [3, 4.5]]), "prompt[1][1]", id="prompt-fraction-token"
    ),
    pytest.param("completion", completion(prompt=[True, False]), "prompt[0]", id="prompt-bools"),
    pytest.param("completion", completion(prompt="x" * 600_000), "prompt", id="prompt-too-long"),
    # what vLLM expands into per-token work or a grammar
    pytest.param(
        "chat", chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", id="301-logit-biases"
    ),
    pytest.param("completion", completion(bad_words=["x"] * 17), "bad_words", id="17-bad-words"),
    pytest.param("chat", chat(bad_words=["ok", "x" * 300]), "bad_words[1]", id="long-bad-word"),
    pytest.param(
        "completion",
        completion(allowed_token_ids=list(range(4097))),
        "allowed_token_ids",
        id="4097-allowed-token-ids",
    ),
    pytest.param("chat", chat(stop_token_ids=list(range(5000))), "stop_token_ids", id="5000-stop-token-ids"),
    pytest.param("chat", chat(stop_token_ids=[1, -2]), "stop_token_ids[1]", id="negative-stop-token-id"),
    pytest.param("chat", chat(prompt_logprobs=-1), "prompt_logprobs", id="prompt-logprobs-all-of-vocab"),
    pytest.param(
        "completion", completion(prompt_logprobs=1000), "prompt_logprobs", id="prompt-logprobs-1000"
    ),
    pytest.param("chat", chat(prompt_logprobs="5"), "prompt_logprobs", id="prompt-logprobs-a-string"),
    pytest.param(
        "chat",
        chat(structured_outputs={"regex": "(a|b)" * 20_000}),
        "structured_outputs",
        id="huge-guided-regex",
    ),
    pytest.param(
        "completion",
        completion(structured_outputs={"choice": [f"choice {i}" for i in range(10_000)]}),
        "structured_outputs",
        id="10000-guided-choices",
    ),
    pytest.param("chat", chat(guided_json=huge_schema(70_000)), "guided_json", id="huge-guided-json"),
    pytest.param(
        "chat",
        chat(
            tools=[
                {"type": "function", "function": {"name": f"f{i}", "parameters": huge_schema(50_000)}}
                for i in range(6)
            ],
            tool_choice="required",
        ),
        "tools",
        id="300kb-of-tools",
    ),
    # tokenize / detokenize
    pytest.param("tokenize", {"model": "m", "prompt": ["a"]}, "prompt", id="tokenize-prompt-list"),
    pytest.param(
        "tokenize", {"model": "m", "messages": [{"role": "wizard"}]}, "messages[0].role", id="tok-role"
    ),
    pytest.param("detokenize", {"model": "m", "tokens": "1 2 3"}, "tokens", id="detokenize-string"),
    pytest.param("detokenize", {"model": "m"}, "tokens", id="detokenize-missing"),
    pytest.param("detokenize", {"model": "m", "tokens": [1, -1]}, "tokens[1]", id="detokenize-negative"),
]


# Shapes vLLM's request model refuses, so our checks leave them to it (tested below: it does).
LEFT_TO_VLLM: list[Any] = [
    pytest.param("chat", chat(stop=["ok", 3]), id="stop-an-int-item"),
    pytest.param("chat", chat(stop={"a": 1}), id="stop-an-object"),
    pytest.param("chat", chat(tools=WEATHER_TOOL), id="tools-not-a-list"),
    pytest.param("chat", chat(tools=["get_weather"]), id="tool-a-string"),
    pytest.param("chat", chat(tools=[{"type": "function"}]), id="tool-missing-function"),
    pytest.param(
        "chat",
        chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
        id="tool-type",
    ),
    pytest.param(
        "chat",
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
        id="tool-parameters-a-string",
    ),
    pytest.param("chat", chat(tools=[WEATHER_TOOL], tool_choice="any"), id="tool_choice-any"),
    pytest.param("chat", chat(tools=[WEATHER_TOOL], tool_choice=1), id="tool_choice-an-int"),
    pytest.param(
        "chat",
        chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": "get_weather"}),
        id="tool_choice-function-a-string",
    ),
    pytest.param(
        "chat",
        chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": 7}}),
        id="tool_choice-name-an-int",
    ),
    pytest.param("chat", chat(response_format="json"), id="response_format-a-string"),
    pytest.param("chat", chat(response_format={"type": "yaml"}), id="response_format-yaml"),
    pytest.param(
        "chat",
        chat(response_format={"type": "json_schema"}),
        id="json_schema-missing",
    ),
    pytest.param(
        "chat",
        chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        id="json_schema-name-missing",
    ),
    pytest.param(
        "chat",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": []}}),
        id="json_schema-schema-a-list",
    ),
    pytest.param("completion", completion(prompt={"text": "hi"}), id="prompt-an-object"),
]


def vllm_parsed(route: str, payload: Any) -> Any:
    """vLLM's request model of `payload` (what the vLLM engine checks), or None if it refuses it."""
    from serve_app.engine.protocol import Route
    from serve_app.engine.vllm.openai_layer import request_parser

    try:
        return request_parser(Route(route))(payload)
    except Exception:  # pydantic's ValidationError, vLLM's VLLMValidationError
        return None


@pytest.mark.parametrize(("route", "payload", "param"), BAD)
def test_bad_requests_are_refused_naming_the_param(route: str, payload: Any, param: str | None) -> None:
    with pytest.raises(InputError) as caught:
        check_request(route, payload, LIMITS, MAX_MODEL_LEN)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.message
    body = json.loads(caught.value.body())
    assert body["error"]["code"] == 400
    assert body["error"]["type"] == "BadRequestError"
    assert body["error"]["param"] == param
    # On the vLLM engine the bounds read vLLM's parsed request: where vLLM accepts the body,
    # they refuse it all the same.
    if isinstance(payload, dict) and (parsed := vllm_parsed(route, payload)) is not None:
        with pytest.raises(InputError) as on_parsed:
            check_request(route, payload, LIMITS, MAX_MODEL_LEN, parsed=parsed)
        assert on_parsed.value.param == param


@pytest.mark.parametrize(("route", "payload"), LEFT_TO_VLLM)
def test_shapes_vllm_refuses_are_left_to_it(route: str, payload: Any) -> None:
    assert vllm_parsed(route, payload) is None, "vLLM accepts it: check it here"
    # The fake engine has no request model: the bounds pass over what they do not understand.
    with contextlib.suppress(InputError):
        check_request(route, payload, LIMITS, MAX_MODEL_LEN)


def test_the_bad_corpus_is_large() -> None:
    assert len(BAD) >= 40


def test_enormous_max_tokens_is_refused_without_a_known_context() -> None:
    with pytest.raises(InputError) as caught:
        check_request("chat", chat(max_tokens=10**30), LIMITS, None)
    assert caught.value.param == "max_tokens"
    check_request("chat", chat(max_tokens=10**6), LIMITS, None)  # vLLM bounds it by the context


def test_context_message_reads_like_vllms() -> None:
    with pytest.raises(
        InputError, match=r"max_tokens \(40000\) must be at most the model's context length \(32768\)"
    ):
        check_request("chat", chat(max_tokens=40_000), LIMITS, MAX_MODEL_LEN)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b'{"model": "m", "prompt": "caf\xe9"}', "not valid UTF-8", id="latin-1-bytes"),
        pytest.param(b'{"prompt": "\xff\xfe"}', "not valid UTF-8", id="invalid-bytes"),
        pytest.param(b'{"prompt": "\xed\xa0\x80"}', "not valid UTF-8", id="encoded-surrogate"),
        pytest.param(b'{"model": "m", ', "not valid JSON", id="truncated-json"),
        pytest.param(b"", "not valid JSON", id="empty-body"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "not valid JSON", id="deeply-nested"),
        pytest.param(b'{"n": 1} trailing', "not valid JSON", id="trailing-garbage"),
    ],
)
def test_undecodable_bodies_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        decode_body(body)
    assert caught.value.status == 400


def test_decode_body_reads_utf8_json() -> None:
    assert decode_body('{"prompt": "café ☕"}'.encode()) == {"prompt": "café ☕"}
    assert decode_body(b'\xef\xbb\xbf{"n": 1}') == {"n": 1}  # a UTF-8 byte-order mark, as json.loads allows
    assert decode_body(b'{"p": "\\ud83d\\ude00"}') == {"p": "\U0001f600"}  # an escaped surrogate pair


def test_oversized_bodies_get_413() -> None:
    check_body_size(LIMITS.max_body_bytes, LIMITS)
    with pytest.raises(InputError) as caught:
        check_body_size(LIMITS.max_body_bytes + 1, LIMITS)
    assert caught.value.status == 413
    assert json.loads(caught.value.body())["error"]["code"] == 413


def test_oversized_headers_are_refused() -> None:
    check_headers({"content-type": "application/json", "authorization": "Bearer k"}, LIMITS)
    check_headers([("x-a", "1"), ("x-a", "2")], LIMITS)
    with pytest.raises(InputError) as caught:
        check_headers([("cookie", "c" * 10_000), ("x-junk", "j" * 10_000)], LIMITS)
    assert caught.value.status == 400
    with pytest.raises(InputError):
        check_headers({"x-big": "v" * 20_000}, LIMITS)
    with pytest.raises(InputError):
        check_headers([(b"x-big", b"v" * 20_000)], LIMITS)  # an ASGI scope's raw headers


def test_limits_are_configurable_and_validated() -> None:
    small = RequestLimits(max_n=2, max_stop=0, max_tools=0)
    with pytest.raises(InputError):
        check_request("chat", chat(n=3), small, None)
    with pytest.raises(InputError):
        check_request("chat", chat(stop=["a"]), small, None)
    check_request("chat", chat(stop=[]), small, None)
    with pytest.raises(ValidationError):
        RequestLimits(max_n=0)
    with pytest.raises(ValidationError):
        RequestLimits(max_bodybytes=1)  # type: ignore[call-arg]


def test_unknown_routes_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown route"):
        check_request("embeddings", {}, LIMITS, None)


GOOD: list[Any] = [
    pytest.param("chat", chat(), id="minimal-chat"),
    pytest.param("chat", chat(n=1, max_tokens=None, temperature=0.7), id="n-1-max_tokens-null"),
    pytest.param("chat", chat(max_tokens=256, max_completion_tokens=None), id="max_tokens"),
    pytest.param("chat", chat(max_completion_tokens=MAX_MODEL_LEN), id="max_completion_tokens-the-context"),
    pytest.param(
        "chat",
        chat(max_tokens=10**9, max_completion_tokens=100),
        id="max_tokens-ignored-beside-completion-tokens",
    ),
    pytest.param("chat", chat(n=2.0, max_tokens=16.0), id="integral-floats"),
    pytest.param("chat", chat(n=8, seed=-1, stop="\n\n"), id="max-n-seed-stop-string"),
    pytest.param("chat", chat(stop=["###", "User:", ""], stop_token_ids=[2]), id="stop-list"),
    pytest.param("chat", chat(logprobs=True, top_logprobs=20), id="logprobs-top_logprobs"),
    pytest.param("chat", chat(logprobs=False, top_logprobs=None), id="logprobs-off-top_logprobs-null"),
    pytest.param("chat", chat(stream=True, stream_options={"include_usage": True}), id="stream_options"),
    pytest.param(
        "chat",
        chat(
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Hi", "name": "alice"},
            ]
        ),
        id="system-developer-named-user",
    ),
    pytest.param(
        "chat",
        user(
            [
                {"type": "text", "text": "What is in these images?"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ]
        ),
        id="multimodal-image_url-parts",
    ),
    pytest.param("chat", user([{"image_url": PNG}, {"type": "text", "text": "?"}]), id="vllm-typeless-image"),
    pytest.param(
        "chat",
        chat(
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_9bK2xQz1a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_9bK2xQz1a", "content": '{"temp_c": 21}'},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "ok"}]},
                {"role": "assistant"},
            ],
            tools=[WEATHER_TOOL],
            tool_choice="auto",
            parallel_tool_calls=False,
        ),
        id="tool-call-round-trip",
    ),
    pytest.param(
        "chat",
        chat(
            tools=[WEATHER_TOOL, {"function": {"name": "no-type_tool", "parameters": None}}],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ),
        id="named-tool_choice-and-typeless-tool",
    ),
    pytest.param("chat", chat(tools=[WEATHER_TOOL], tool_choice="required"), id="tool_choice-required"),
    pytest.param("chat", chat(tool_choice=None, tools=None), id="tools-null"),
    pytest.param(
        "chat",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "strict": True,
                    "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                },
            }
        ),
        id="json_schema-response_format",
    ),
    pytest.param("chat", chat(response_format={"type": "json_object"}), id="json_object"),
    pytest.param("chat", chat(response_format={"type": "text"}), id="text-format"),
    pytest.param(
        "chat",
        chat(
            response_format={
                "type": "structural_tag",
                "structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}],
                "triggers": ["<f>"],
            }
        ),
        id="vllm-structural_tag",
    ),
    pytest.param(
        "chat",
        chat(
            ignore_eos=True,
            min_tokens=4,
            top_k=40,
            repetition_penalty=1.1,
            guided_json={"type": "object"},
            structured_outputs={"regex": "[a-z]+"},
            chat_template_kwargs={"enable_thinking": False},
            skip_special_tokens=False,
        ),
        id="extra-vllm-params",
    ),
    pytest.param("chat", user("\U0001f600 café 日本語 \u200b"), id="non-ascii-text"),
    pytest.param(
        "chat", user(["Bare string parts, ", {"type": "text", "text": "as vLLM takes them."}]), id="str-parts"
    ),
    pytest.param("chat", chat(messages=[{"role": "user", "content": "x"}] * 512), id="512-messages"),
    pytest.param("completion", completion(), id="minimal-completion"),
    pytest.param("completion", completion(prompt=[1, 2, 3, 4], max_tokens=8), id="token-id-prompt"),
    pytest.param("completion", completion(prompt=list(range(20_000))), id="long-token-id-prompt"),
    pytest.param("completion", completion(prompt=[[1, 2], [3, 4, 5]], n=2), id="token-id-prompts"),
    pytest.param("completion", completion(prompt=["a", "b", "c"], stop=["\n"]), id="string-prompts"),
    pytest.param("completion", completion(logprobs=5, echo=True, max_tokens=0), id="echo-max_tokens-0"),
    pytest.param("completion", completion(logprobs=0, best_of=3, n=2, seed=7), id="best_of-logprobs-0"),
    pytest.param("completion", completion(prompt=None, prompt_embeds="ZmFrZQ=="), id="prompt_embeds"),
    pytest.param(
        "completion",
        completion(stream=True, stream_options={"include_usage": True}, max_tokens=None),
        id="stream",
    ),
    pytest.param("completion", completion(suffix="end", ignore_eos=True, min_tokens=2), id="suffix-extras"),
    pytest.param("tokenize", {"model": "m", "prompt": "Hello world"}, id="tokenize-prompt"),
    pytest.param(
        "tokenize",
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
        id="tokenize-messages",
    ),
    pytest.param("detokenize", {"model": "m", "tokens": [1, 22, 333]}, id="detokenize"),
    pytest.param("detokenize", {"model": "m", "tokens": []}, id="detokenize-empty"),
]


@pytest.mark.parametrize(("route", "payload"), GOOD)
def test_valid_requests_pass(route: str, payload: Any) -> None:
    check_request(route, payload, LIMITS, MAX_MODEL_LEN)
    check_request(route, payload, LIMITS, None)
    parsed = vllm_parsed(route, payload)
    assert parsed is not None, "vLLM refuses a request the corpus calls valid"
    check_request(route, payload, LIMITS, MAX_MODEL_LEN, parsed=parsed)
    # The same request, as the ingress sees it on the wire.
    check_request(route, decode_body(json.dumps(payload).encode()), LIMITS, MAX_MODEL_LEN)


def test_the_good_corpus_is_large() -> None:
    assert len(GOOD) >= 20


def _one_mib_chat() -> bytes:
    """A valid chat body just under 1 MiB: 500 messages of about 2 KB, and 64 tools."""
    messages: list[dict[str, Any]] = []
    for i in range(250):
        messages.append({"role": "user", "content": f"Question {i}: " + "lorem ipsum dolor sit amet " * 70})
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": "Answer: " + "consectetur " * 150}]}
        )
    body = json.dumps(chat(messages=messages, tools=[WEATHER_TOOL] * 64, stop=["\n\n"])).encode()
    assert 0.9 * LIMITS.max_body_bytes < len(body) <= LIMITS.max_body_bytes, len(body)
    return body


@pytest.mark.parametrize(
    ("route", "body"),
    [
        pytest.param("chat", _one_mib_chat(), id="chat"),
        pytest.param(
            "completion", json.dumps(completion(prompt=list(range(140_000)))).encode(), id="token-ids"
        ),
    ],
)
def test_checking_a_one_mib_body_is_cheap(route: str, body: bytes) -> None:
    payload = decode_body(body)
    check_body_size(len(body), LIMITS)
    start = time.perf_counter()
    for _ in range(5):
        check_request(route, payload, LIMITS, MAX_MODEL_LEN)
    elapsed_ms = (time.perf_counter() - start) / 5 * 1000
    print(f"check_request({route}) on {len(body) / 2**20:.2f} MiB: {elapsed_ms:.1f} ms")


def test_routes_may_be_given_as_the_route_enum() -> None:
    from serve_app.engine.protocol import Route

    check_request(Route.CHAT, chat(), LIMITS, MAX_MODEL_LEN)
    with pytest.raises(InputError):
        check_request(Route.COMPLETION, completion(n=1000), LIMITS, MAX_MODEL_LEN)
