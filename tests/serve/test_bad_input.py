"""Hostile and broken requests get a 4xx in OpenAI's shape before any engine work, and the
app goes on serving with the same replicas (no engine restarted)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from serve_app.local.ray_token import auth_headers
from tests.serve.conftest import APP_NAME, RunningApp

MODEL = "tiny-mistral-v3"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, "max_tokens": 4, **fields}).encode()


# (name, path, raw body, extra headers, expected status)
CORPUS: list[tuple[str, str, bytes, dict[str, str], int]] = [
    ("body-over-1MiB", CHAT, chat(stop="x" * (1100 * 1024)), {}, 413),
    ("headers-12KiB", CHAT, chat(), {"x-filler": "a" * 12_000}, 400),
    ("not-json", CHAT, b"{not json", {}, 400),
    (
        "invalid-utf8",
        CHAT,
        b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        {},
        400,
    ),
    ("lone-surrogate", CHAT, chat(messages=[{"role": "user", "content": "\ud800"}]), {}, 400),
    (
        "deep-nesting",
        CHAT,
        b'{"model": "' + MODEL.encode() + b'", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        {},
        400,
    ),
    ("body-a-list", CHAT, b"[1, 2]", {}, 400),
    ("model-missing", CHAT, json.dumps({"messages": USER}).encode(), {}, 400),
    ("model-unknown", CHAT, chat(model="gpt-17"), {}, 404),
    ("model-a-number", CHAT, chat(model=42), {}, 400),
    ("n-huge", CHAT, chat(n=100_000), {}, 400),
    ("n-zero", CHAT, chat(n=0), {}, 400),
    ("n-a-string", CHAT, chat(n="2"), {}, 400),
    ("max-tokens-negative", CHAT, chat(max_tokens=-1), {}, 400),
    ("max-tokens-enormous", CHAT, chat(max_tokens=10**15), {}, 400),
    ("max-tokens-past-context", CHAT, chat(max_tokens=5000), {}, 400),
    ("top-logprobs-huge", CHAT, chat(logprobs=True, top_logprobs=1000), {}, 400),
    ("stop-too-many", CHAT, chat(stop=[f"s{i}" for i in range(200)]), {}, 400),
    ("messages-empty", CHAT, chat(messages=[]), {}, 400),
    ("messages-not-a-list", CHAT, chat(messages="hi"), {}, 400),
    ("messages-too-many", CHAT, chat(messages=USER * 10_000), {}, 400),
    ("role-wrong", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), {}, 400),
    ("role-missing", CHAT, chat(messages=[{"content": "hi"}]), {}, 400),
    ("content-a-number", CHAT, chat(messages=[{"role": "user", "content": 7}]), {}, 400),
    ("tools-not-a-list", CHAT, chat(tools={"type": "function"}), {}, 400),
    ("tool-without-function", CHAT, chat(tools=[{"type": "function"}]), {}, 400),
    ("tool-bad-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b;rm"}}]), {}, 400),
    (
        "tool-parameters-a-string",
        CHAT,
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
        {},
        400,
    ),
    (
        "tool-schema-huge",
        CHAT,
        chat(
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "description": "d" * 100_000}},
                }
            ]
        ),
        {},
        400,
    ),
    ("tool-choice-bad", CHAT, chat(tools=[TOOL], tool_choice="sometimes"), {}, 400),
    ("response-format-bad", CHAT, chat(response_format={"type": "yaml"}), {}, 400),
    (
        "json-schema-not-an-object",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": "x"}),
        {},
        400,
    ),
    ("temperature-a-string", CHAT, chat(temperature="hot"), {}, 400),
    ("prompt-a-dict", "/v1/completions", json.dumps({"model": MODEL, "prompt": {"a": 1}}).encode(), {}, 400),
    (
        "prompt-too-many",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": ["x"] * 1000}).encode(),
        {},
        400,
    ),
]


def _replicas(app: RunningApp) -> dict[str, list[str]]:
    data = httpx.get(
        f"{app.dashboard_url}/api/serve/applications/", headers=auth_headers(), timeout=30
    ).json()
    deployments = data["applications"][APP_NAME]["deployments"]
    return {name: sorted(r["replica_id"] for r in d["replicas"]) for name, d in deployments.items()}


@pytest.fixture(scope="module")
def replicas_before(local_app: RunningApp) -> dict[str, list[str]]:
    return _replicas(local_app)


@pytest.mark.parametrize(("name", "path", "body", "headers", "status"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_request_gets_an_openai_error(
    local_app: RunningApp,
    replicas_before: dict[str, list[str]],
    name: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    resp = httpx.post(
        local_app.url + path,
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=60,
    )
    assert resp.status_code == status, (name, resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    assert isinstance(error["message"], str) and error["message"]


def test_app_still_serves_with_the_same_replicas(
    local_app: RunningApp, replicas_before: dict[str, list[str]]
) -> None:
    # Runs after the corpus (module order).
    resp = httpx.post(
        f"{local_app.url}{CHAT}", content=chat(), headers={"content-type": "application/json"}, timeout=60
    )
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] is not None
    assert _replicas(local_app) == replicas_before
