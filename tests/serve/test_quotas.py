"""Per-key quotas on the real app: over a limit, 429 with Retry-After; then recovery."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from serve_app.guards.auth import hash_key
from tests.serve.conftest import RunningApp

PREFIX = "/limited"


@pytest.fixture(scope="module")
def limited_url(local_app: RunningApp) -> Iterator[str]:
    from ray import serve

    from serve_app.config import load_app_config
    from serve_app.serving.builder import build_openai_app

    def fake(model_id: str, tokens_per_s: float) -> dict[str, Any]:
        return {
            "id": model_id,
            "source": "none",
            "engine": "fake",
            "num_cpus": 0,
            "num_gpus": 0,
            "engine_args": {"ttft_s": 0.01, "tokens_per_s": tokens_per_s, "max_num_seqs": 16},
        }

    keys = ["rate-key", "slow-key", "token-key", "model-key"]
    config = load_app_config(
        {
            "models": [fake("chatty", 50), fake("bulk", 20000)],
            "ingress": {"num_cpus": 0},
            "auth": {"api_keys": [hash_key(k) for k in keys]},
            "quotas": {
                "default": {"concurrent_requests": 8},
                "keys": {
                    hash_key("rate-key"): {"requests_per_minute": 30},  # a request per 2 s after 30
                    hash_key("slow-key"): {"concurrent_requests": 2},
                    hash_key("token-key"): {"tokens_per_minute": 3000},  # 50 tokens/s
                    hash_key("model-key"): {"models": {"chatty": {"concurrent_requests": 1}}},
                },
            },
        }
    )
    serve.run(build_openai_app(config), name="limited", route_prefix=PREFIX)
    try:
        yield local_app.url + PREFIX
    finally:
        serve.delete("limited")


def _ask(url: str, key: str, model: str = "chatty", max_tokens: int = 2) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def _is_429(resp: httpx.Response, text: str) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["type"] == "RateLimitError" and error["code"] == 429
    assert text in error["message"], error["message"]
    assert int(resp.headers["retry-after"]) >= 1


def test_requests_per_minute(limited_url: str) -> None:
    # A burst of one minute's budget (30), plus what refills meanwhile (one per 2 s).
    start, answered = time.monotonic(), 0
    while (over := _ask(limited_url, "rate-key")).status_code == 200:
        answered += 1
        assert answered <= 30 + (time.monotonic() - start) / 2 + 1, "no limit applied"
    refilled = (time.monotonic() - start) / 2
    assert 30 <= answered <= 30 + refilled + 1, (answered, refilled)
    _is_429(over, "Request rate limit")
    assert int(over.headers["retry-after"]) <= 2
    assert _ask(limited_url, "slow-key").status_code == 200  # other keys are not affected
    time.sleep(int(over.headers["retry-after"]) + 0.2)
    assert _ask(limited_url, "rate-key").status_code == 200  # recovered


def test_concurrent_requests(limited_url: str) -> None:
    with ThreadPoolExecutor(3) as pool:
        # 150 tokens at 50 tokens/s: each holds its slot for 3 s, so the three overlap even
        # when a busy machine spreads their arrival.
        answers = list(pool.map(lambda _: _ask(limited_url, "slow-key", max_tokens=150), range(3)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 429], codes
    _is_429(next(r for r in answers if r.status_code == 429), "concurrent requests")
    assert _ask(limited_url, "slow-key").status_code == 200  # the slots are free again


def test_tokens_per_minute(limited_url: str) -> None:
    first = _ask(limited_url, "token-key", model="bulk", max_tokens=3300)
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    # Overdraws the 3000-token minute by 300: 6 s to refill, time for the next request to come.
    assert used > 3300
    over = _ask(limited_url, "token-key", model="bulk")
    _is_429(over, "Token rate limit")
    time.sleep(int(over.headers["retry-after"]) + 0.2)
    assert _ask(limited_url, "token-key", model="bulk").status_code == 200


def test_limit_on_one_model(limited_url: str) -> None:
    with ThreadPoolExecutor(3) as pool:
        # 150 tokens of `chatty` hold its one slot for 3 s.
        chatty = [pool.submit(_ask, limited_url, "model-key", "chatty", 150) for _ in range(2)]
        bulk = pool.submit(_ask, limited_url, "model-key", "bulk", 20)
        codes = sorted(f.result().status_code for f in chatty)
        assert bulk.result().status_code == 200
    assert codes == [200, 429], codes
    _is_429(next(f.result() for f in chatty if f.result().status_code == 429), "on `chatty`")
