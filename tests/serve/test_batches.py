"""Batches on real Ray Serve: a batch over both demo vLLM models answers as the same requests
sent one by one, a file larger than one of Serve's default gRPC messages comes back whole, and a
batch whose ingress replica is killed, then whose whole app is stopped and started again, still
answers every line exactly once; between interactive requests the engines run at idle CPU
priority."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from serve_app.config import ModelConfig
from serve_app.local.processes import process_label
from serve_app.local.ray_token import auth_headers
from serve_app.serving.cpu_priority import SUPPORTED, can_leave_idle, thread_ids
from tests.serve.conftest import APP_NAME, RunningApp

APP, PREFIX = "batches", "/batches"
CHAT = "/v1/chat/completions"
AUTH = {"Authorization": "Bearer none"}  # a keyless app takes uploads with any Authorization


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def _request(i: int, model: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Question {i}: name a French river."}]
    return {
        "custom_id": f"q{i}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": messages, "temperature": 0, **body},
    }


def _until(get: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float, what: str) -> Any:
    """Poll `get()` (through whatever HTTP errors a restart gives) until `done` says so."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        try:
            value = get()
        except (httpx.HTTPError, ValueError, KeyError):
            value = None
        if value is not None and done(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {value})")


def test_a_batch_over_both_demo_models_answers_as_the_requests_sent_one_by_one(local_app: RunningApp) -> None:
    models = [m.id for m in local_app.config.models]
    lines = [_request(i, models[i % 2], max_tokens=8) for i in range(12)]
    client = openai.OpenAI(base_url=f"{local_app.url}/v1", api_key="none", max_retries=0)
    uploaded = client.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    batch = _until(
        lambda: client.batches.retrieve(batch.id), lambda b: b.status == "completed", 120, "the batch"
    )
    assert batch.request_counts.completed == 12 and batch.error_file_id is None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).read().splitlines()]
    assert [r["custom_id"] for r in out] == [f"q{i}" for i in range(12)]
    for record, line in zip(out, lines, strict=True):
        alone = httpx.post(f"{local_app.url}{CHAT}", json=line["body"], timeout=60).json()
        assert record["response"]["body"]["choices"][0]["message"] == alone["choices"][0]["message"]


def _engine_processes(model: ModelConfig) -> list[psutil.Process]:
    """The vLLM processes (engine core, workers, frontends) below `model`'s replica."""
    title = f"ServeReplica:{APP_NAME}:{model.deployment_name}"
    replicas = [p for p in psutil.Process().children(recursive=True) if process_label(p) == title]
    assert len(replicas) == 1, replicas
    return [p for p in replicas[0].children(recursive=True) if p.name().startswith("VLLM::")]


def _policies(processes: list[psutil.Process], names: tuple[str, ...]) -> set[int]:
    """The scheduling policies of the threads of those `processes` named so."""
    return {os.sched_getscheduler(tid) for p in processes if p.name() in names for tid in thread_ids(p.pid)}


@pytest.mark.skipif(
    not (SUPPORTED and can_leave_idle()), reason="this user may not take a thread out of SCHED_IDLE"
)
def test_an_engine_runs_at_idle_cpu_priority_but_for_interactive_requests(local_app: RunningApp) -> None:
    """configs/local.yaml sets batches.idle_cpu_priority: each engine's core and workers run
    under SCHED_IDLE but while an interactive request to its model is in flight."""
    assert local_app.config.batches.idle_cpu_priority
    asked, other = (m.id for m in local_app.config.models)
    compute = ("VLLM::EngineCore", "VLLM::Worker")
    engines = {model.id: _engine_processes(model) for model in local_app.config.models}
    idle = {os.SCHED_IDLE}
    for model, processes in engines.items():
        assert {p.name() for p in processes} >= set(compute), (model, processes)
        _until(lambda: _policies(processes, compute), idle.__eq__, 5, f"{model}'s engine idle")  # noqa: B023
    body = {"model": asked, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 64}
    body |= {"stream": True, "ignore_eos": True}
    asked_seen: list[set[int]] = []
    other_seen: list[set[int]] = []
    with httpx.stream("POST", f"{local_app.url}{CHAT}", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):  # a token: the request is in flight
                asked_seen.append(_policies(engines[asked], compute))
                other_seen.append(_policies(engines[other], compute))
    # At its first token (its last chunks may reach this client after the replica let go).
    assert asked_seen and asked_seen[0] == {os.SCHED_OTHER}, asked_seen
    # The other engine rises only for its own health checks (a few ms every 10 s).
    assert idle in other_seen, other_seen
    _until(lambda: _policies(engines[asked], compute), idle.__eq__, 5, "the engine idle again")


def test_a_file_larger_than_serves_default_message_bound_downloads_whole(local_app: RunningApp) -> None:
    """Serve's proxy relays what the ingress sends in gRPC messages bounded at 4 MiB by
    default: the proxy front raises the bound (serve_app.local.front), so a file sent back whole
    passes (it was a 500)."""
    lines = [_request(i, "tiny-mistral-v3", max_tokens=8, user="u" * 200) for i in range(20_000)]
    data = _jsonl(lines)
    assert len(data) > 6 * 2**20
    with httpx.Client(base_url=local_app.url, headers=AUTH, timeout=120) as http:
        files = {"file": ("big.jsonl", data)}
        uploaded = http.post("/v1/files", files=files, data={"purpose": "batch"}).raise_for_status().json()
        try:
            content = http.get(f"/v1/files/{uploaded['id']}/content")
            assert content.status_code == 200, content.text[:200]
            assert content.content == data
        finally:
            http.delete(f"/v1/files/{uploaded['id']}")


def _config(store: Path) -> Any:
    from serve_app.config import load_app_config

    model = {
        "id": "slow",
        "source": "none",
        "engine": "fake",
        "num_gpus": 0,
        "num_cpus": 0,
        "engine_args": {"ttft_s": 0.0, "tokens_per_s": 50.0, "max_num_seqs": 16},
    }
    return load_app_config(
        {
            "models": [model],
            "ingress": {"num_cpus": 0},
            "batches": {"store": str(store), "max_in_flight_per_model": 4, "retry_max_s": 1.0},
        }
    )


def _deploy(config: Any) -> None:
    from ray import serve

    from serve_app.serving.builder import build_openai_app

    serve.run(build_openai_app(config), name=APP, route_prefix=PREFIX)


def _ingress_pid(app: RunningApp) -> int:
    data = httpx.get(
        f"{app.dashboard_url}/api/serve/applications/", headers=auth_headers(), timeout=30
    ).json()
    replicas = data["applications"][APP]["deployments"]["OpenAIIngress"]["replicas"]
    (running,) = [r for r in replicas if r["state"] == "RUNNING"]
    return int(running["pid"])


def test_a_batch_survives_its_ingress_killed_and_its_app_restarted(
    local_app: RunningApp, tmp_path: Path
) -> None:
    from ray import serve

    url = local_app.url + PREFIX
    config = _config(tmp_path / "store")
    lines = [_request(i, "slow", max_tokens=8) for i in range(80)]  # ~0.16 s each, 4 at a time
    _deploy(config)
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            files = {"file": ("in.jsonl", _jsonl(lines))}
            uploaded = http.post("/v1/files", files=files, data={"purpose": "batch"}).json()
            body = {"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h"}
            batch_id = http.post("/v1/batches", json=body).json()["id"]

            def batch() -> dict[str, Any]:
                return http.get(f"/v1/batches/{batch_id}").raise_for_status().json()  # type: ignore[no-any-return]

            def answered(at_least: int) -> Callable[[dict[str, Any]], bool]:
                return lambda b: b["request_counts"]["completed"] >= at_least

            _until(batch, answered(8), 60, "the first answers")
            os.kill(_ingress_pid(local_app), signal.SIGKILL)
            mid = _until(batch, answered(24), 60, "answers after the ingress was replaced")
            assert mid["status"] == "in_progress"
            serve.delete(APP)  # the whole app, the batch service with it
            _deploy(config)
            done = _until(batch, lambda b: b["status"] == "completed", 120, "the batch's end after a restart")
            assert done["request_counts"] == {"total": 80, "completed": 80, "failed": 0}
            content = http.get(f"/v1/files/{done['output_file_id']}/content").content
            out = [json.loads(x) for x in content.splitlines()]
            assert [r["custom_id"] for r in out] == [f"q{i}" for i in range(80)]
            assert all(r["response"]["status_code"] == 200 for r in out)
    finally:
        serve.delete(APP)
