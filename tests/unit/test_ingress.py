"""The ingress's logic in this process (no Ray): routing by `model`, API keys, quotas, the wait
for a replica, the retry, load shedding, relaying streams, and what is recorded.

The model servers are real (`ModelServer` with the fake engine); the handles between them and
the ingress stand in for Serve's (tests/support/inprocess.py). What needs Serve itself (its
routers, proxies, replicas in processes) is tested in tests/serve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from serve_app.guards.auth import hash_key
from serve_app.serving.routing import prefix_affinity
from serve_app.serving.server import ModelServer
from tests.support.expected import model_not_found
from tests.support.inprocess import CHAT, HI, FailingReplicas, InProcessApp, chat, config, fake, serve, sse

# --- routing --------------------------------------------------------------------------------


def test_whole_and_streamed_answers_by_model_and_alias(access_log: list[dict[str, Any]]) -> None:
    cfg = config(fake("small", aliases=["tiny"]), fake("other"))

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            whole = await http.post(CHAT, json=chat("tiny"), headers={"X-Request-Id": "rid-7"})
            assert whole.status_code == 200, whole.text
            assert whole.json()["id"] == "chatcmpl-rid-7" and whole.json()["usage"]["completion_tokens"] == 3
            streamed = await http.post(CHAT, json=chat("other", stream=True))
            events = sse(streamed.text)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert events[-1] == "[DONE]"
        # The engine is asked for usage (to count tokens); the client did not ask, so it sees none.
        assert all("usage" not in json.loads(e) for e in events[:-1])
        assert [c[0] for c in app.handles["small"].calls] == ["chat"]

    serve(cfg, scenario)
    logged = access_log
    assert [(e["model"], e["status"], e["stream"]) for e in logged] == [
        ("small", 200, False),
        ("other", 200, True),
    ]
    assert logged[0]["request_id"] == "rid-7" and logged[0]["completion_tokens"] == 3
    assert logged[1]["completion_tokens"] == 3 and logged[1]["ttft_s"] is not None  # counted all the same


def test_model_is_required_unless_one_model_is_served() -> None:
    async def two(app: InProcessApp) -> None:
        async with app.client() as http:
            missing = await http.post(CHAT, json={"messages": HI})
            unknown = await http.post(CHAT, json=chat("gpt-17"))
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
        assert unknown.status_code == 404
        assert unknown.json() == model_not_found("gpt-17")

    async def one(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json={"messages": HI, "max_tokens": 2})
        assert resp.status_code == 200 and resp.json()["model"] == "small"

    serve(config(fake("small"), fake("other")), two)
    serve(config(fake("small")), one)


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"{not json", 400), (b"[1, 2]", 400), (b'{"model": 42}', 400), (b"\xff\xfe", 400)],
)
def test_bodies_that_cannot_be_routed(body: bytes, status: int) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, content=body, headers={"content-type": "application/json"})
        assert resp.status_code == status
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        assert app.handles["small"].calls == []  # nothing reached a model

    serve(config(), scenario)


def test_body_size_is_checked_before_and_after_reading() -> None:
    cfg = config(limits={"max_body_bytes": 1000})

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            big = await http.post(CHAT, json=chat(stop="x" * 2000))
            declared = await http.post(
                CHAT,
                content=json.dumps(chat()),
                headers={"content-type": "application/json", "content-length": "5000"},
            )
        assert big.status_code == 413 and "limit is 1000 bytes" in big.json()["error"]["message"]
        assert declared.status_code == 413
        assert app.handles["small"].calls == []

    serve(cfg, scenario)


def test_models_are_listed_under_every_name() -> None:
    cfg = config(fake("org/small", aliases=["tiny"]), fake("other", owned_by="team"))

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            listed = (await http.get("/v1/models")).json()["data"]
            alias = (await http.get("/v1/models/tiny")).json()
            missing = await http.get("/v1/models/nothing")
        assert [m["id"] for m in listed] == ["org/small", "tiny", "other"]
        assert (
            alias["root"] == "org/small" and alias["aliases"] == ["org/small"] and alias["owned_by"] == "org"
        )
        # Not in the config: asked of a replica (the fake engine's default context).
        assert alias["max_model_len"] == 4096
        assert listed[2]["owned_by"] == "team"
        assert missing.status_code == 404

    serve(cfg, scenario)


# --- keys -------------------------------------------------------------------------------------


ROUTES = [
    ("POST", CHAT, chat()),
    ("POST", "/v1/completions", {"model": "small", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/tokenize", {"model": "small", "prompt": "hi"}),
    ("POST", "/detokenize", {"model": "small", "tokens": [1, 2]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/small", None),
]


def test_every_route_but_health_needs_a_key(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("file-key\n")
    cfg = config(auth={"api_keys": [hash_key("config-key")], "api_keys_file": str(keyfile)})

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            for method, path, body in ROUTES:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "config-key"}):
                    resp = await http.request(method, path, json=body, headers=headers)
                    assert resp.status_code == 401, (path, headers, resp.text)
                    assert resp.json()["error"]["type"] == "AuthenticationError"
                for key in ("config-key", "file-key"):
                    resp = await http.request(
                        method, path, json=body, headers={"Authorization": f"Bearer {key}"}
                    )
                    assert resp.status_code not in (401, 500), (path, resp.text)
            assert (await http.get("/health")).status_code == 200

    serve(cfg, scenario)


def test_cors_only_for_configured_origins() -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}

    async def open_to_one(app: InProcessApp) -> None:
        async with app.client() as http:
            ok = await http.options(CHAT, headers={"Origin": "https://app.example.com", **preflight})
            other = await http.options(CHAT, headers={"Origin": "https://evil.example", **preflight})
        assert ok.headers.get("access-control-allow-origin") == "https://app.example.com"
        assert "access-control-allow-credentials" not in ok.headers
        assert other.headers.get("access-control-allow-origin") is None

    async def closed(app: InProcessApp) -> None:
        async with app.client() as http:
            plain = await http.get("/v1/models", headers={"Origin": "https://app.example.com"})
        assert "access-control-allow-origin" not in plain.headers

    serve(config(auth={"cors_allow_origins": ["https://app.example.com"]}), open_to_one)
    serve(config(), closed)


# --- quotas -----------------------------------------------------------------------------------


def _is_429(resp: Any, text: str) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["type"] == "RateLimitError" and text in error["message"], error
    assert int(resp.headers["retry-after"]) >= 1


def test_quotas_answer_429_with_retry_after(access_log: list[dict[str, Any]]) -> None:
    keys = {name: hash_key(name) for name in ("rate", "slow", "tokens", "model")}
    slow = fake("slow-model", engine_args={"tokens_per_s": 20.0})
    cfg = config(
        fake("small"),
        slow,
        auth={"api_keys": list(keys.values())},
        quotas={
            "keys": {
                keys["rate"]: {"requests_per_minute": 3},
                keys["slow"]: {"concurrent_requests": 1},
                keys["tokens"]: {"tokens_per_minute": 50},
                keys["model"]: {"models": {"slow-model": {"concurrent_requests": 1}}},
            }
        },
    )

    async def scenario(app: InProcessApp) -> None:
        import asyncio

        def client(key: str) -> Any:
            return app.client({"Authorization": f"Bearer {key}"})

        async with client("rate") as http:
            answers = [await http.post(CHAT, json=chat()) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        _is_429(answers[-1], "Request rate limit reached for this API key")

        # 20 tokens at 20 tokens/s hold the one slot for a second.
        async with client("slow") as http:
            long, short = await asyncio.gather(
                http.post(CHAT, json=chat("slow-model", max_tokens=20)),
                _after(0.3, http.post(CHAT, json=chat())),
            )
            assert long.status_code == 200
            _is_429(short, "Too many concurrent requests for this API key")
            assert (await http.post(CHAT, json=chat())).status_code == 200  # the slot is free again

        # Tokens are charged when a request ends: one request overdraws, the next waits.
        async with client("tokens") as http:
            assert (await http.post(CHAT, json=chat(max_tokens=60))).status_code == 200
            _is_429(await http.post(CHAT, json=chat()), "Token rate limit reached for this API key")

        async with client("model") as http:
            on_model, other_model, second = await asyncio.gather(
                http.post(CHAT, json=chat("slow-model", max_tokens=20)),
                _after(0.3, http.post(CHAT, json=chat("small"))),
                _after(0.3, http.post(CHAT, json=chat("slow-model"))),
            )
        assert on_model.status_code == 200 and other_model.status_code == 200
        _is_429(second, "on `slow-model`")

    serve(cfg, scenario)
    refused = [e for e in access_log if e["status"] == 429]
    assert len(refused) == 4 and all(e["error"] == "quota" for e in refused)


async def _after(delay_s: float, request: Any) -> Any:
    import asyncio

    await asyncio.sleep(delay_s)
    return await request


def test_a_keys_priority_replaces_the_clients_on_priority_models() -> None:
    key = hash_key("batch")
    cfg = config(
        fake("ranked", engine_args={"scheduling_policy": "priority"}),
        fake("plain"),
        auth={"api_keys": [key]},
        quotas={"keys": {key: {"priority": 10}}},
    )

    async def scenario(app: InProcessApp) -> None:
        async with app.client({"Authorization": "Bearer batch"}) as http:
            for model in ("ranked", "plain"):
                assert (await http.post(CHAT, json=chat(model, priority=-5))).status_code == 200
        ranked = json.loads(app.handles["ranked"].calls[0][1])
        plain = json.loads(app.handles["plain"].calls[0][1])
        assert ranked["priority"] == 10  # the key's
        assert plain["priority"] == -5  # the model does not schedule by priority: left as sent

    serve(cfg, scenario)


# --- replicas that fail -----------------------------------------------------------------------


def _died() -> RayActorError:
    return RayActorError()


def test_a_request_that_fails_before_its_first_byte_is_tried_once_more(
    access_log: list[dict[str, Any]],
) -> None:
    replicas: dict[str, FailingReplicas] = {}

    def flaky(name: str, server: ModelServer) -> FailingReplicas:
        replicas[name] = FailingReplicas(server, [_died()])
        return replicas[name]

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            retried = await http.post(CHAT, json=chat())
            assert retried.status_code == 200, retried.text
            replicas["small"].failures[:] = [_died(), _died()]
            failed = await http.post(CHAT, json=chat(stream=True))
        assert failed.status_code == 503 and failed.headers["retry-after"] == "10"
        assert (
            failed.json()["error"]["message"] == "The model `small` could not serve the request; retry later."
        )
        assert len(app.handles["small"].calls) == 4  # 2 + 2: the first try and one retry each
        # The first try goes where the conversation's affinity says; the retry to any replica.
        affinity = prefix_affinity(chat())
        assert affinity is not None and affinity.opening
        assert app.handles["small"].keywords == [{"affinity": affinity}, {}, {"affinity": affinity}, {}]

    serve(config(), scenario, wrap=flaky)
    logged = access_log
    assert [e["status"] for e in logged] == [200, 503]
    assert "RayActorError" in logged[1]["error"]


def test_a_full_router_queue_and_a_model_with_no_replica_answer_503_with_retry_after() -> None:
    replicas: dict[str, FailingReplicas] = {}
    cfg = config(fake("small", deployment={"request_wait_timeout_s": 0.2}))

    def shedding(name: str, server: ModelServer) -> FailingReplicas:
        replicas[name] = FailingReplicas(
            server, [BackPressureError(num_queued_requests=1, max_queued_requests=1), "hang"]
        )
        return replicas[name]

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            full = await http.post(CHAT, json=chat())
            none = await http.post(CHAT, json=chat())
            after = await http.post(CHAT, json=chat())
        assert full.status_code == 503 and "at capacity" in full.json()["error"]["message"]
        assert none.status_code == 503 and "no replica ready" in none.json()["error"]["message"]
        assert int(full.headers["retry-after"]) > 0 and int(none.headers["retry-after"]) > 0
        assert after.status_code == 200  # neither is retried: the next request is served

    serve(cfg, scenario, wrap=shedding)


class _BreaksMidStream:
    """A replica whose stream breaks after its head and one chunk (its process died)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        sent = 0
        async for item in self.server.generate(*args):
            if isinstance(item, bytes):
                if sent == 1:
                    raise _died()
                sent += 1
            yield item

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


def test_a_stream_that_breaks_ends_with_an_error_event_and_done(access_log: list[dict[str, Any]]) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat(stream=True, max_tokens=20))
        events = sse(resp.text)
        assert resp.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 503
        assert len(events) < 20  # cut short: some of the 20 tokens, the error, [DONE]

    serve(config(), scenario, wrap=lambda _name, server: _BreaksMidStream(server))
    (entry,) = access_log
    assert entry["status"] == 503 and entry["error"].startswith("stream interrupted")
