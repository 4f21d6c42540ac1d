"""Hostile clients at the ingress, in this process (no Ray): bodies that never end or never
arrive, slow bodies against quotas, request ids, cross-site requests to keyless runs, odd JSON,
retries that would spread damage, and the prefix cache shared between keys.

Each test failed on the code before its fix. Engine-side bounds are tested in test_limits.py and
tests/contract; the real app in tests/serve/test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from ray.exceptions import RayActorError

from serve_app.guards.auth import hash_key
from serve_app.serving.server import ModelServer
from tests.support.inprocess import CHAT, FailingReplicas, InProcessApp, chat, config, fake, over_http, serve

JSON = {"content-type": "application/json"}


def _chunks(count: int, size: int, pause_s: float, pulled: list[int]) -> AsyncIterator[bytes]:
    """A body sent `size` bytes at a time, counting what the server pulled."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            pulled.append(size)
            await asyncio.sleep(pause_s)
            yield b" " * size

    return body()


# --- bodies -------------------------------------------------------------------------------------


def test_a_body_without_a_length_is_refused_at_the_limit_not_read_whole() -> None:
    read: list[int] = []

    async def scenario(app: InProcessApp) -> None:
        async with over_http(app.app, body_read=read) as url, httpx.AsyncClient(timeout=30) as http:
            # No Content-Length: sent chunked, 100 pieces of 100 bytes against a 1,000-byte limit.
            resp = await http.post(url + CHAT, content=_chunks(100, 100, 0.005, []), headers=JSON)
        assert resp.status_code == 413, resp.text
        assert "the limit is 1000 bytes" in resp.json()["error"]["message"]

    serve(config(limits={"max_body_bytes": 1000}), scenario)
    assert sum(read) < 2_000, f"the ingress read {sum(read)} bytes of a body over its 1,000-byte limit"


def test_a_body_that_does_not_arrive_in_time_is_refused() -> None:
    async def scenario(app: InProcessApp) -> None:
        async with over_http(app.app) as url, httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(url + CHAT, content=_chunks(8, 10, 0.25, []), headers=JSON)
        assert resp.status_code == 408, resp.text
        assert resp.json()["error"]["code"] == 408
        assert app.handles["small"].calls == []

    serve(config(limits={"max_body_seconds": 0.5}), scenario)


def test_a_keys_concurrency_is_held_while_its_body_arrives() -> None:
    """Slow bodies must not fill the ingress past a key's concurrency limit."""
    key = hash_key("one-at-a-time")
    cfg = config(auth={"api_keys": [key]}, quotas={"keys": {key: {"concurrent_requests": 1}}})
    body = json.dumps(chat()).encode()

    async def slow_body() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.6)
        yield body

    async def scenario(app: InProcessApp) -> None:
        headers = {**JSON, "Authorization": "Bearer one-at-a-time"}
        async with over_http(app.app) as url, httpx.AsyncClient(timeout=30, headers=headers) as http:
            slow = asyncio.ensure_future(http.post(url + CHAT, content=slow_body()))
            await asyncio.sleep(0.3)  # the slow body is on its way
            second = await http.post(url + CHAT, json=chat())
            first = await slow
        assert second.status_code == 429, second.text
        assert first.status_code == 200, first.text

    serve(cfg, scenario)


# --- request ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["x" * 129, "has space", "semi;colon", "ünïcode"])
def test_request_ids_are_short_and_plain(request_id: str) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat(), headers={"X-Request-Id": request_id.encode()})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "x-request-id"
        assert request_id not in resp.text  # not echoed
        assert app.handles["small"].calls == []

    serve(config(), scenario)


def test_a_plain_request_id_is_kept() -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat(), headers={"X-Request-Id": "job-7:part_2.a"})
        assert resp.status_code == 200 and resp.json()["id"] == "chatcmpl-job-7:part_2.a"

    serve(config(), scenario)


# --- keyless runs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_keyless_run_refuses_the_posts_a_web_page_can_send_cross_site(content_type: str) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, content=json.dumps(chat()), headers={"content-type": content_type})
        assert resp.status_code == 415, resp.text
        assert app.handles["small"].calls == []

    serve(config(), scenario)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "10.0.0.1"])
def test_a_keyless_run_answers_only_loopback_host_names(host: str) -> None:
    """A web page's script can reach a loopback server under its own name (DNS rebinding)."""

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat(), headers={"Host": host})
            models = await http.get("/v1/models", headers={"Host": host})
            ok = await http.get("/v1/models", headers={"Host": "localhost:8000"})
        assert resp.status_code == 421 and models.status_code == 421, resp.text
        assert ok.status_code == 200
        assert app.handles["small"].calls == []

    serve(config(), scenario)


def test_with_keys_the_host_and_content_type_are_not_held_to_loopback() -> None:
    """With API keys a page cannot send the key cross-site: a gateway may name the app as it likes."""
    cfg = config(auth={"api_keys": [hash_key("k")]})

    async def scenario(app: InProcessApp) -> None:
        headers = {"Authorization": "Bearer k", "Host": "llm.example.com", "content-type": "text/plain"}
        async with app.client() as http:
            resp = await http.post(CHAT, content=json.dumps(chat()), headers=headers)
        assert resp.status_code == 200, resp.text

    serve(cfg, scenario)


# --- odd JSON and error answers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "unwanted"),
    [
        (b'{"model": "small", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "set_int_max_str_digits"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', ""),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', ""),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "seed": -Infinity}', ""),
    ],
    ids=["giant-integer", "NaN", "Infinity", "-Infinity"],
)
def test_odd_json_numbers_get_a_plain_400(body: bytes, unwanted: str) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, content=body, headers=JSON)
        assert resp.status_code == 400, resp.text
        if unwanted:
            assert unwanted not in resp.text
        assert app.handles["small"].calls == []

    serve(config(), scenario)


def test_an_unknown_model_name_is_not_echoed_at_length() -> None:
    name = "m" * 1_000_000

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat(name))
        assert resp.status_code == 404
        assert len(resp.content) < 1_000, len(resp.content)

    serve(config(limits={"max_body_bytes": 2_000_000}), scenario)


def test_a_trailing_slash_is_an_openai_404_not_a_redirect() -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT + "/", json=chat())
        assert resp.status_code == 404, (resp.status_code, resp.headers)
        assert resp.json()["error"]["code"] == 404

    serve(config(), scenario)


# --- retries --------------------------------------------------------------------------------------


class _AcceptsThenDies:
    """A replica that takes the request, then dies with it (the request killed its engine)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        yield None
        raise RayActorError()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


def test_a_request_that_reached_a_replica_is_not_tried_on_another() -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat())
        assert resp.status_code == 503 and resp.headers["retry-after"] == "10"
        assert len(app.handles["small"].calls) == 1  # one replica lost, not two

    serve(config(), scenario, wrap=lambda _name, server: _AcceptsThenDies(server))


def test_a_request_no_replica_took_is_still_tried_once_more() -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat())
        assert resp.status_code == 200
        assert len(app.handles["small"].calls) == 2

    serve(config(), scenario, wrap=lambda _name, server: FailingReplicas(server, [RayActorError()]))


# --- quotas ---------------------------------------------------------------------------------------


def test_every_sequence_a_request_asks_for_counts_against_the_request_rate() -> None:
    key = hash_key("batch")
    cfg = config(auth={"api_keys": [key]}, quotas={"keys": {key: {"requests_per_minute": 8}}})
    many = {"model": "small", "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2}

    async def scenario(app: InProcessApp) -> None:
        async with app.client({"Authorization": "Bearer batch"}) as http:
            first = await http.post("/v1/completions", json=many)  # 4 prompts x 2: 8 sequences
            second = await http.post(CHAT, json=chat())
        assert first.status_code == 200, first.text
        assert second.status_code == 429, second.text

    serve(cfg, scenario)


def test_a_stream_cut_before_its_end_is_charged_what_it_got() -> None:
    key = hash_key("leaver")
    cfg = config(
        fake("small", engine_args={"tokens_per_s": 100.0}),
        auth={"api_keys": [key]},
        quotas={"keys": {key: {"tokens_per_minute": 40}}},
    )

    async def scenario(app: InProcessApp) -> None:
        headers = {**JSON, "Authorization": "Bearer leaver"}
        async with over_http(app.app) as url, httpx.AsyncClient(timeout=30, headers=headers) as http:
            body = chat(max_tokens=1000, stream=True)
            async with http.stream("POST", url + CHAT, json=body) as resp:
                events = 0
                async for line in resp.aiter_lines():
                    events += line.startswith("data: ")
                    if events == 60:
                        break  # leave just before the end would come
            await asyncio.sleep(0.5)  # the ingress sees the client gone
            after = await http.post(url + CHAT, json=chat())
        assert after.status_code == 429, "a stream cut short cost nothing"

    serve(cfg, scenario)


# --- the prefix cache -----------------------------------------------------------------------------


def test_each_key_gets_a_prefix_cache_of_its_own() -> None:
    keys = {name: hash_key(name) for name in ("alice", "bob")}
    cfg = config(auth={"api_keys": list(keys.values())})

    async def scenario(app: InProcessApp) -> None:
        for name in ("alice", "alice", "bob"):
            async with app.client({"Authorization": f"Bearer {name}"}) as http:
                body = chat(cache_salt="bob-s-salt") if name == "alice" else chat()
                assert (await http.post(CHAT, json=body)).status_code == 200
        salts = [json.loads(call[1])["cache_salt"] for call in app.handles["small"].calls]
        assert salts[0] == salts[1] != salts[2]  # alice's, alice's, bob's
        assert "bob-s-salt" not in salts  # a client does not choose its salt
        assert not any(key.removeprefix("sha256:") in salt for salt in salts for key in keys.values())

    serve(cfg, scenario)


def test_without_keys_requests_are_left_unsalted() -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            assert (await http.post(CHAT, json=chat())).status_code == 200
        assert "cache_salt" not in json.loads(app.handles["small"].calls[0][1])

    serve(config(), scenario)
