"""API keys on the real app: every route but /health needs one once keys are configured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.guards.auth import hash_key
from tests.serve.conftest import RunningApp

PREFIX = "/secure"


@pytest.fixture(scope="module")
def secure_url(local_app: RunningApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second application (fake-engine model) with keys from the config and from a file."""
    from ray import serve

    from serve_app.config import load_app_config
    from serve_app.serving.builder import build_openai_app

    keyfile: Path = tmp_path_factory.mktemp("keys") / "api_keys"
    keyfile.write_text("file-key\n")
    config = load_app_config(
        {
            "models": [{"id": "guarded", "source": "none", "engine": "fake", "num_cpus": 0, "num_gpus": 0}],
            "ingress": {"num_cpus": 0},
            "auth": {
                "api_keys": [hash_key("config-key")],
                "api_keys_file": str(keyfile),
                "cors_allow_origins": ["https://app.example.com"],
            },
        }
    )
    serve.run(build_openai_app(config), name="secure", route_prefix=PREFIX)
    try:
        yield local_app.url + PREFIX
    finally:
        serve.delete("secure")


ROUTES = [
    (
        "POST",
        "/v1/chat/completions",
        {"model": "guarded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    ),
    ("POST", "/v1/completions", {"model": "guarded", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/tokenize", {"model": "guarded", "prompt": "hi"}),
    ("POST", "/detokenize", {"model": "guarded", "tokens": [1, 2]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/guarded", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_needs_a_key(secure_url: str, method: str, path: str, body: object) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "config-key"}):
        resp = httpx.request(method, secure_url + path, json=body, headers=headers, timeout=30)
        assert resp.status_code == 401, (headers, resp.text)
        error = resp.json()["error"]
        assert error["code"] == 401 and error["type"] == "AuthenticationError"
    for key in ("config-key", "file-key"):
        resp = httpx.request(
            method, secure_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert resp.status_code != 401, resp.text
        assert resp.status_code < 500


def test_health_stays_open(secure_url: str) -> None:
    assert httpx.get(secure_url + "/health", timeout=60).status_code == 200


def test_cors_only_for_configured_origins(secure_url: str, local_app: RunningApp) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(
        secure_url + "/v1/chat/completions", headers={"Origin": "https://app.example.com", **preflight}
    )
    assert ok.headers.get("access-control-allow-origin") == "https://app.example.com"
    assert "access-control-allow-credentials" not in ok.headers
    other = httpx.options(
        secure_url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
    )
    assert other.headers.get("access-control-allow-origin") is None
    # The app without CORS configured sends no CORS header at all.
    plain = httpx.get(local_app.url + "/v1/models", headers={"Origin": "https://app.example.com"}, timeout=60)
    assert "access-control-allow-origin" not in plain.headers
