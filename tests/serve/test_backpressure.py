"""A model whose router queue is full sheds load with 503 + Retry-After, then recovers."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import RunningApp

PREFIX = "/small"


@pytest.fixture(scope="module")
def small_url(local_app: RunningApp) -> Iterator[str]:
    from ray import serve

    from serve_app.config import load_app_config
    from serve_app.serving.builder import build_openai_app

    model = {
        "id": "narrow",
        "source": "none",
        "engine": "fake",
        "num_cpus": 0,
        "num_gpus": 0,
        # 10 tokens at 5 tokens/s: each request holds the only slot for about 2 s.
        "engine_args": {"tokens_per_s": 5, "max_num_seqs": 1},
        "deployment": {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1},
    }
    config = load_app_config({"models": [model], "ingress": {"num_cpus": 0}, "batches": {"enabled": False}})
    serve.run(build_openai_app(config), name="small", route_prefix=PREFIX)
    try:
        yield local_app.url + PREFIX
    finally:
        serve.delete("small")


def _ask(url: str) -> httpx.Response:
    body = {"model": "narrow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_full_queue_sheds_load_with_retry_after(small_url: str) -> None:
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _ask(small_url), range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert set(codes) <= {200, 503}, codes
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) > 0
            assert "at capacity" in r.json()["error"]["message"]
    assert _ask(small_url).status_code == 200  # recovered once the queue drained
