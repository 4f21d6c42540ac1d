"""LoRA adapters on the real stack (vLLM on the CPU, two frontend processes): an adapter added
at run time through the admin route answers as the same files do under the config's name, and
bad ones get a clear 4xx with nothing else disturbed. Answers of the config's adapters against
`vllm serve --enable-lora --lora-modules` are in test_conformance.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.serve.conftest import ADMIN_KEY, RunningApp

MODEL = "tiny-mistral-v3"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def answers(url: str, model: str, count: int = 2) -> list[str]:
    """`count` greedy answers of `model`, asked at once (each frontend takes one)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Name a painter."}], "max_tokens": 8}

    def one(_: int) -> str:
        resp = httpx.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model
        return str(resp.json()["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def admin(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, headers=ADMIN, timeout=120)


def test_an_adapter_added_at_run_time_answers_as_its_files_do(local_app: RunningApp) -> None:
    url = local_app.url
    source = "./models/adapters/tiny-mistral-v3-lora-0"
    resp = admin(url, "load_lora_adapter", {"lora_name": "runtime-copy", "lora_path": source, "model": MODEL})
    assert resp.status_code == 200, resp.text
    try:
        runtime = answers(url, "runtime-copy")
        assert runtime == answers(url, f"{MODEL}-lora-0") and runtime[0] != answers(url, MODEL, 1)[0]
        listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert listed["runtime-copy"]["parent"] == MODEL
    finally:
        assert admin(url, "unload_lora_adapter", {"lora_name": "runtime-copy"}).status_code == 200
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "runtime-copy", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 404


def test_bad_adapters_are_refused_and_disturb_nothing(local_app: RunningApp) -> None:
    url = local_app.url
    refused = [
        ("./models/adapters/tiny-mistral-tekken-lora-0", 400, "wrong base model"),
        ("./models/tiny-mistral-v3", 403, "outside"),
        ("./models/adapters/../adapters/none-such", 404, "does not exist"),
    ]
    for path, status, message in refused:
        resp = admin(url, "load_lora_adapter", {"lora_name": "bad", "lora_path": path, "model": MODEL})
        assert resp.status_code == status and message in resp.json()["error"]["message"], resp.text
    resp = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "./models/adapters/a"}
    )
    assert resp.status_code == 401  # the admin key, not none
    assert len(answers(url, MODEL)) == 2
