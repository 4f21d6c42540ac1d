"""The real app over HTTP: the official `openai` client and raw SSE, both demo models."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.serve.conftest import RunningApp
from tests.support.expected import model_not_found

MODELS = ["tiny-mistral-v3", "tiny-mistral-tekken"]
MESSAGES = [{"role": "user", "content": "Who is the best French painter? Answer in one short sentence."}]


@pytest.fixture(scope="module")
def client(local_app: RunningApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{local_app.url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a Server-Sent Events response, parsed by hand."""
    events, buf = [], ""
    for text in response.iter_text():
        buf += text
        while "\n\n" in buf:
            event, buf = buf.split("\n\n", 1)
            for line in event.splitlines():
                assert line.startswith("data: "), line
                events.append(line[len("data: ") :])
    assert buf == ""
    return events


@pytest.mark.parametrize("model", MODELS)
def test_chat_completion(client: openai.OpenAI, model: str) -> None:
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=7)  # type: ignore[arg-type]
    assert resp.model == model
    assert resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens > 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7


@pytest.mark.parametrize("model", MODELS)
def test_completion(client: openai.OpenAI, model: str) -> None:
    resp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5)
    assert resp.object == "text_completion"
    assert resp.choices[0].text
    assert resp.usage is not None and resp.usage.completion_tokens == 5


@pytest.mark.parametrize("model", MODELS)
def test_chat_stream_with_usage(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(content_chunks) <= 6
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_raw_sse(local_app: RunningApp) -> None:
    body = {
        "model": "tiny-mistral-tekken",
        "prompt": "Once upon a time",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{local_app.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    text = "".join(p["choices"][0]["text"] for p in payloads if p["choices"])
    assert text
    assert payloads[-1]["usage"]["completion_tokens"] == 5


def test_chat_stream_without_usage_has_none(local_app: RunningApp) -> None:
    body = {"model": "tiny-mistral-v3", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{local_app.url}/v1/chat/completions", json=body, timeout=60) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) or json.loads(e)["usage"] is None for e in events[:-1])


def test_aliases_route_to_the_same_model(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="mistral-nemo-demo", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    # Like OpenAI's own aliases, the response names the model's canonical id.
    assert resp.model == "tiny-mistral-tekken"
    assert resp.usage is not None and resp.usage.completion_tokens == 2


def test_models_list_and_get(client: openai.OpenAI, local_app: RunningApp) -> None:
    ids = {m.id for m in client.models.list()}
    adapters = {f"tiny-mistral-v3-lora-{i}" for i in range(3)}  # the config's LoRA adapters
    assert (
        ids == {"tiny-mistral-v3", "mistral-7b-demo", "tiny-mistral-tekken", "mistral-nemo-demo"} | adapters
    )
    model = client.models.retrieve("tiny-mistral-tekken")
    assert model.id == "tiny-mistral-tekken"
    raw = httpx.get(f"{local_app.url}/v1/models/tiny-mistral-tekken", timeout=60).json()
    assert raw["max_model_len"] == 4096
    assert raw["aliases"] == ["mistral-nemo-demo"]
    assert raw["owned_by"] == "mistral-serve" and raw["object"] == "model"
    assert abs(raw["created"] - time.time()) < 3600
    alias = httpx.get(f"{local_app.url}/v1/models/mistral-nemo-demo", timeout=60).json()
    assert alias["root"] == "tiny-mistral-tekken" and alias["aliases"] == ["tiny-mistral-tekken"]


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI, local_app: RunningApp) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="mistral-huge", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert err.value.status_code == 404
    resp = httpx.get(f"{local_app.url}/v1/models/mistral-huge", timeout=60)
    assert resp.status_code == 404
    assert resp.json() == model_not_found("mistral-huge")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": "tiny-mistral-v3", "messages": "hello"}', "messages"),
        (
            b'{"model": "tiny-mistral-v3", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            None,
        ),
        (
            b'{"model": "tiny-mistral-v3", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999}',
            None,
        ),
    ],
)
def test_malformed_body_is_400_in_openai_shape(local_app: RunningApp, body: bytes, param: str | None) -> None:
    resp = httpx.post(
        f"{local_app.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 400 and error["type"] in ("BadRequestError", "Bad Request") and error["message"]
    if param is not None:
        assert error["param"].removeprefix("body.") == param


def test_request_id_is_kept_and_returned(local_app: RunningApp) -> None:
    resp = httpx.post(
        f"{local_app.url}/v1/chat/completions",
        json={"model": "tiny-mistral-v3", "messages": MESSAGES, "max_tokens": 2},
        headers={"X-Request-Id": "req-test-42"},
        timeout=60,
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "req-test-42"
    assert resp.json()["id"] == "chatcmpl-req-test-42"


def test_health(local_app: RunningApp) -> None:
    resp = httpx.get(f"{local_app.url}/health", timeout=60)
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_unknown_route_is_404_in_openai_shape(local_app: RunningApp) -> None:
    resp = httpx.get(f"{local_app.url}/v1/nothing-here", timeout=60)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == 404


@pytest.mark.parametrize("model", MODELS)
def test_cancelled_stream_frees_its_engine_request(local_app: RunningApp, model: str) -> None:
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 3000,
        "stream": True,
        "ignore_eos": True,
    }
    assert local_app.engine_stats(model) == 0
    with httpx.stream("POST", f"{local_app.url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_bytes()
        next(chunks)
        next(chunks)
        assert local_app.engine_stats(model) == 1
    # The client is gone: the engine must drop the request long before 3000 tokens.
    deadline = time.monotonic() + 5.0
    while local_app.engine_stats(model) != 0:
        assert time.monotonic() < deadline, "the engine still holds the cancelled request"
        time.sleep(0.1)


def test_text_model_refuses_images_with_a_clear_400(local_app: RunningApp) -> None:
    body = {
        "model": "tiny-mistral-v3",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            }
        ],
    }
    resp = httpx.post(f"{local_app.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "The model `tiny-mistral-v3` does not accept image input."
