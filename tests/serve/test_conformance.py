"""Conformance with `vllm serve`: the same corpus against plain vLLM and our app, same results.

The plain vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`) and our app
serve the same demo model with the same engine arguments. Each request of the corpus
(temperature 0 or a fixed seed; streaming and not; valid and invalid) goes to both, one at a
time, and the answers must agree: text, token ids and log-probabilities where exposed, finish
reasons, usage, tool calls, status codes and error types. Fields that differ by nature
(ids, timestamps) are left out of the comparison.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from serve_app.local.launcher import free_port
from serve_app.tools.bench.vllm_cli import vllm_serve_args
from tests.conftest import ROOT
from tests.serve.conftest import RunningApp

MODEL = "tiny-mistral-v3"
MSG = [{"role": "user", "content": "Name three French painters."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MSG, "max_tokens": 12, "temperature": 0, **extra}


def completion(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "The best French painter is",
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }


# (name, path, body): every parameter the conformance issue lists appears here.
CORPUS: list[tuple[str, str, Any]] = [
    ("chat-greedy", "/v1/chat/completions", chat()),
    ("chat-alias", "/v1/chat/completions", chat(model="mistral-7b-demo")),
    # LoRA adapters of the config (`vllm serve --enable-lora --lora-modules`): three of them,
    # for a replica that holds two (max_loras 2), so that one is evicted and loaded again.
    ("chat-lora-0", "/v1/chat/completions", chat(model=f"{MODEL}-lora-0")),
    ("chat-lora-1-stream", "/v1/chat/completions", chat(model=f"{MODEL}-lora-1", stream=True)),
    ("completion-lora-2", "/v1/completions", completion(model=f"{MODEL}-lora-2", logprobs=2)),
    (
        "chat-lora-0-again",
        "/v1/chat/completions",
        chat(model=f"{MODEL}-lora-0", n=2, temperature=1.0, seed=5),
    ),
    ("err-lora-unknown", "/v1/chat/completions", chat(model=f"{MODEL}-lora-7")),
    ("chat-n3-seed", "/v1/chat/completions", chat(n=3, temperature=1.0, seed=7)),
    (
        "chat-sampling",
        "/v1/chat/completions",
        chat(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=11),
    ),
    (
        "chat-penalties",
        "/v1/chat/completions",
        chat(presence_penalty=1.5, frequency_penalty=0.5, seed=3, temperature=0.7),
    ),
    ("chat-stop", "/v1/chat/completions", chat(max_tokens=40, stop=["e", "a"])),
    ("chat-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=3, max_tokens=5)),
    ("chat-max-completion-tokens", "/v1/chat/completions", chat(max_completion_tokens=7, max_tokens=None)),
    ("chat-user", "/v1/chat/completions", chat(user="user-1234")),
    (
        "chat-json-object",
        "/v1/chat/completions",
        chat(response_format={"type": "json_object"}, max_tokens=30),
    ),
    (
        "chat-json-schema",
        "/v1/chat/completions",
        chat(
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
            max_tokens=40,
        ),
    ),
    ("chat-tools-auto", "/v1/chat/completions", chat(tools=[WEATHER_TOOL], tool_choice="auto")),
    ("chat-tools-none", "/v1/chat/completions", chat(tools=[WEATHER_TOOL], tool_choice="none")),
    (
        "chat-tools-required",
        "/v1/chat/completions",
        chat(tools=[WEATHER_TOOL], tool_choice="required", max_tokens=40),
    ),
    (
        "chat-tools-named",
        "/v1/chat/completions",
        chat(
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
        ),
    ),
    (
        "chat-tool-result-turn",
        "/v1/chat/completions",
        chat(
            tools=[WEATHER_TOOL],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "abcDEF123",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'},
            ],
        ),
    ),
    ("chat-stream", "/v1/chat/completions", chat(stream=True)),
    ("chat-stream-usage", "/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True})),
    ("chat-stream-n2-seed", "/v1/chat/completions", chat(stream=True, n=2, temperature=1.0, seed=5)),
    (
        "chat-stream-logprobs",
        "/v1/chat/completions",
        chat(stream=True, logprobs=True, top_logprobs=2, max_tokens=4),
    ),
    (
        "chat-stream-tools-required",
        "/v1/chat/completions",
        chat(stream=True, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=40),
    ),
    (
        "chat-stream-tools-named",
        "/v1/chat/completions",
        chat(
            stream=True,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
        ),
    ),
    ("cmpl-greedy", "/v1/completions", completion()),
    ("cmpl-token-ids", "/v1/completions", completion(prompt=[1, 1782, 4433, 1117], return_token_ids=True)),
    ("cmpl-n2-seed", "/v1/completions", completion(n=2, temperature=1.0, seed=42)),
    ("cmpl-logprobs", "/v1/completions", completion(logprobs=3, max_tokens=4)),
    ("cmpl-echo", "/v1/completions", completion(echo=True, max_tokens=3)),
    ("cmpl-stop", "/v1/completions", completion(stop=[" "], max_tokens=30)),
    ("cmpl-stream-usage", "/v1/completions", completion(stream=True, stream_options={"include_usage": True})),
    (
        "cmpl-json-schema",
        "/v1/completions",
        completion(
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            max_tokens=40,
        ),
    ),
    ("tokenize-prompt", "/tokenize", {"model": MODEL, "prompt": "Bonjour, Paris!"}),
    ("tokenize-chat", "/tokenize", {"model": MODEL, "messages": MSG}),
    ("detokenize", "/detokenize", {"model": MODEL, "tokens": [1782, 4433, 1117, 3621]}),
    # Errors: status code, type and parameter must match too.
    ("err-unknown-model", "/v1/chat/completions", chat(model="mistral-huge")),
    ("err-context-too-long", "/v1/chat/completions", chat(max_tokens=5000)),
    ("err-prompt-too-long", "/v1/completions", completion(prompt="bonjour " * 5000)),
    ("err-temperature", "/v1/chat/completions", chat(temperature=-1)),
    ("err-top-p", "/v1/chat/completions", chat(top_p=1.5)),
    ("err-n-zero", "/v1/chat/completions", chat(n=0)),
    ("err-top-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=50)),
    ("err-negative-max-tokens", "/v1/chat/completions", chat(max_tokens=-3)),
    ("err-messages-type", "/v1/chat/completions", chat(messages="hello")),
    ("err-bad-role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}])),
    ("err-tool-choice-without-tools", "/v1/chat/completions", chat(tool_choice="required")),
    (
        "err-named-tool-unknown",
        "/v1/chat/completions",
        chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
    ),
    ("err-bad-json-schema", "/v1/chat/completions", chat(response_format={"type": "json_schema"})),
    ("err-prompt-type", "/v1/completions", completion(prompt={"x": 1})),
]
# `None` values above stand for "leave the field out".
for _, _, _body in CORPUS:
    for key in [k for k, v in _body.items() if v is None]:
        del _body[key]


@pytest.fixture(scope="module")
def plain_vllm(local_app: RunningApp) -> Iterator[str]:
    model = local_app.config.find(MODEL)
    assert model is not None
    port = free_port()
    env = {**os.environ, **model.env, "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.Popen(
        vllm_serve_args(model, port),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "vllm serve exited during start-up"
            assert time.monotonic() < deadline, "vllm serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _post(url: str, path: str, body: Any) -> tuple[int, Any]:
    """Status and parsed answer; a stream is folded into one comparable answer."""
    with httpx.stream("POST", url + path, json=body, timeout=120) as resp:
        raw = resp.read()
        if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
            return 200, _fold_stream(raw.decode())
        return resp.status_code, json.loads(raw)


def _fold_stream(text: str) -> dict[str, Any]:
    events = [e[len("data: ") :] for e in text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk.get("choices", []):
            slot = choices.setdefault(
                c["index"], {"text": "", "finish_reason": None, "tool_calls": {}, "logprobs": {}}
            )
            delta = c.get("delta") or {}
            slot["text"] += delta.get("content") or c.get("text") or ""
            if c.get("finish_reason"):
                slot["finish_reason"] = c["finish_reason"]
            for key, values in (c.get("logprobs") or {}).items():
                # vLLM merges deltas that queue up while its consumer is busy, so where chunk
                # boundaries fall depends on timing: compare the concatenation.
                if isinstance(values, list):
                    slot["logprobs"].setdefault(key, []).extend(values)
            for tc in delta.get("tool_calls") or []:
                call = slot["tool_calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
    return {"model": chunks[0].get("model"), "choices": choices, "usage": usage}


_VOLATILE = {"id", "created", "system_fingerprint"}


def _normalize(value: Any) -> Any:
    """Drop what differs by nature between two servers: ids and timestamps."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in _VOLATILE:
                continue
            out[key] = _normalize(item)
        return out
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _compare(status_a: int, body_a: Any, status_b: int, body_b: Any, name: str) -> None:
    assert status_a == status_b, f"{name}: status {status_a} (vllm) != {status_b} (ours): {body_a} / {body_b}"
    if status_a != 200:
        err_a, err_b = body_a["error"], body_b["error"]
        assert set(err_b) == {"message", "type", "param", "code"}, err_b
        assert (err_a["type"], err_a["code"]) == (err_b["type"], err_b["code"]), f"{name}: {err_a} / {err_b}"
        if err_a.get("param") is not None:
            assert err_a["param"] == err_b["param"], f"{name}: {err_a} / {err_b}"
        return
    assert _normalize(body_a) == _normalize(body_b), name


@pytest.mark.parametrize(("name", "path", "body"), CORPUS, ids=[c[0] for c in CORPUS])
def test_same_answer_as_vllm_serve(
    plain_vllm: str, local_app: RunningApp, name: str, path: str, body: Any
) -> None:
    status_a, answer_a = _post(plain_vllm, path, copy.deepcopy(body))
    status_b, answer_b = _post(local_app.url, path, copy.deepcopy(body))
    _compare(status_a, answer_a, status_b, answer_b, name)
    if name.startswith("err-"):
        assert status_b >= 400, f"{name} should fail: {answer_b}"
    elif status_b == 200 and "choices" in answer_b:
        assert answer_b["choices"], name


OPENAI_CALLS = [c for c in CORPUS if c[1] in ("/v1/chat/completions", "/v1/completions")]


@pytest.mark.parametrize(("name", "path", "body"), OPENAI_CALLS, ids=[c[0] for c in OPENAI_CALLS])
def test_corpus_through_the_openai_client(local_app: RunningApp, name: str, path: str, body: Any) -> None:
    """The official client accepts every answer (and every error) of ours, as it would vLLM's."""
    client = openai.OpenAI(base_url=f"{local_app.url}/v1", api_key="unused", max_retries=0)
    create = client.chat.completions.create if path == "/v1/chat/completions" else client.completions.create
    kwargs = copy.deepcopy(body)
    common = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "presence_penalty"}
    common |= {"frequency_penalty", "logprobs", "user", "stream", "stream_options"}
    if path == "/v1/chat/completions":
        standard = common | {
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "response_format",
            "tools",
            "tool_choice",
        }
    else:
        standard = common | {"prompt", "echo"}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in standard}
    status, raw = _post(local_app.url, path, copy.deepcopy(body))
    if status != 200:
        with pytest.raises(openai.APIStatusError) as err:
            create(**kwargs, extra_body=extra)
        assert err.value.status_code == status
        return
    result = create(**kwargs, extra_body=extra)
    if kwargs.get("stream"):
        chunks = list(result)
        assert chunks, name
        text = "".join(
            (c.choices[0].delta.content or "") if path.endswith("chat/completions") else c.choices[0].text
            for c in chunks
            if c.choices and c.choices[0].index == 0
        )
        assert text == raw["choices"].get(0, raw["choices"].get("0", {})).get("text", ""), name
    else:
        first = result.choices[0]
        text = first.message.content if path.endswith("chat/completions") else first.text
        expected = (
            raw["choices"][0]["message"]["content"]
            if path.endswith("chat/completions")
            else raw["choices"][0]["text"]
        )
        assert text == expected, name
