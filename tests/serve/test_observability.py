"""Metrics, request ids and access logs of the real app (real vLLM engines), read where
operators read them: Ray's Prometheus endpoint, the Ray dashboard's API and Ray's log files."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.local.ray_token import auth_headers
from serve_app.tools.dashboard import DEFAULT_DASHBOARD, dashboard_metric_names, load_dashboard
from serve_app.tools.load import sse_events
from tests.serve.conftest import APP_NAME, RunningApp
from tests.support.prom import Scrape, scrape, wait_for

# The model whose replica runs its engine itself (one frontend): with several frontend
# processes, vLLM's own metrics stay in them, unexported (README, Several vLLM frontend processes).
MODEL = "tiny-mistral-tekken"
REQUESTS = "ray_mistral_serve_requests_total"
VLLM_TOKENS = "ray_vllm_generation_tokens_total"  # vLLM's own, exported apart from ours


def _chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count the stars tonight."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # exactly max_tokens tokens, so the counts are known
        **extra,
    }


def _stream(client: httpx.Client, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        return [json.loads(data) for data in sse_events(resp.iter_bytes()) if data != "[DONE]"]


def _settled(app: RunningApp) -> Scrape:
    """A scrape once earlier tests' requests have all been exported (Ray exports every second)."""
    import time

    last = scrape(app.metrics_urls())
    for _ in range(20):
        time.sleep(2.5)
        now = scrape(app.metrics_urls())
        counters = [
            (REQUESTS, {"model": MODEL}),
            ("ray_mistral_serve_completion_tokens_total", {"model": MODEL}),
            ("ray_mistral_serve_prompt_tokens_total", {"model": MODEL}),
            (VLLM_TOKENS, {"model_name": MODEL}),
        ]
        if all(now.total(name, **labels) == last.total(name, **labels) for name, labels in counters):
            return now
        last = now
    return last


@pytest.fixture(scope="module")
def traffic(local_app: RunningApp) -> dict[str, Any]:
    """Known traffic to MODEL: answered, streamed, failed and cancelled requests; the
    scrape before and after it."""
    before = _settled(local_app)
    url = local_app.url
    prompt_tokens = 0
    with httpx.Client(timeout=120) as client:
        for _ in range(3):
            resp = client.post(f"{url}/v1/chat/completions", json=_chat(5))
            assert resp.status_code == 200
            prompt_tokens += resp.json()["usage"]["prompt_tokens"]
        with_usage = _stream(client, url, _chat(6, stream_options={"include_usage": True}))
        prompt_tokens += with_usage[-1]["usage"]["prompt_tokens"]
        without_usage = _stream(client, url, _chat(6))
        prompt_tokens += with_usage[-1]["usage"]["prompt_tokens"]  # the same prompt
        assert client.post(f"{url}/v1/chat/completions", json=_chat(-1)).status_code == 400
        unknown = {**_chat(5), "model": "no-such-model"}
        assert client.post(f"{url}/v1/chat/completions", json=unknown).status_code == 404
        # A stream the client leaves after its first chunk.
        body = {**_chat(3000), "stream": True}
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            next(resp.iter_lines())
    expected = {"ok": 5, "bad": 1, "unknown": 1, "cancelled": 1}
    completion_tokens = 3 * 5 + 2 * 6

    def arrived(now: Scrape) -> bool:
        def delta(**labels: str) -> float:
            return now.total(REQUESTS, **labels) - before.total(REQUESTS, **labels)

        return (
            delta(model=MODEL, route="chat", status="200") >= expected["ok"]
            and delta(model=MODEL, status="499") >= expected["cancelled"]
            and now.total("ray_mistral_serve_engine_running_requests", model=MODEL) == 0
            and now.total(VLLM_TOKENS, model_name=MODEL) - before.total(VLLM_TOKENS, model_name=MODEL)
            >= completion_tokens
        )

    after = wait_for(local_app.metrics_urls, arrived)
    return {
        "before": before,
        "after": after,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "streams": (with_usage, without_usage),
    }


def _delta(traffic: dict[str, Any], name: str, **labels: str) -> float:
    return float(traffic["after"].total(name, **labels) - traffic["before"].total(name, **labels))


def test_requests_are_counted_by_model_route_and_status(traffic: dict[str, Any]) -> None:
    assert _delta(traffic, REQUESTS, model=MODEL, route="chat", status="200") == 5
    assert _delta(traffic, REQUESTS, model=MODEL, route="chat", status="400") == 1
    assert _delta(traffic, REQUESTS, model=MODEL, route="chat", status="499") == 1
    assert _delta(traffic, REQUESTS, model="_unknown", route="chat", status="404") == 1
    for sample in traffic["after"].series(REQUESTS):
        assert {"model", "route", "status"} <= sample.labels.keys()


def test_tokens_match_the_usage_clients_saw(traffic: dict[str, Any]) -> None:
    completion = _delta(traffic, "ray_mistral_serve_completion_tokens_total", model=MODEL)
    prompt = _delta(traffic, "ray_mistral_serve_prompt_tokens_total", model=MODEL)
    assert completion == traffic["completion_tokens"]
    assert prompt == traffic["prompt_tokens"]
    # Counting a stream's tokens does not change what its client sees.
    with_usage, without_usage = traffic["streams"]
    assert "usage" in with_usage[-1]
    assert not any("usage" in chunk for chunk in without_usage)


def test_latency_histograms_count_each_kind_of_request(traffic: dict[str, Any]) -> None:
    def count(name: str, **labels: str) -> float:
        return _delta(traffic, f"ray_mistral_serve_{name}_count", model=MODEL, **labels)

    assert count("time_to_first_token_seconds", route="chat") == 3  # 2 streams + the cancelled one
    assert count("time_per_output_token_seconds", route="chat") == 2
    assert count("request_duration_seconds", route="chat") == 7  # every request that named MODEL
    assert count("queue_wait_seconds") == 7  # every request a replica took (the 400 too)
    after: Scrape = traffic["after"]
    buckets = after.series("ray_mistral_serve_time_to_first_token_seconds_bucket")
    assert {float(b.labels["le"]) for b in buckets} >= {0.05, 0.1, 0.5, 1.0, 5.0}


def test_engine_load_and_in_flight_gauges(traffic: dict[str, Any]) -> None:
    after: Scrape = traffic["after"]
    for name in ("running_requests", "waiting_requests", "kv_cache_usage"):
        series = [s for s in after.series(f"ray_mistral_serve_engine_{name}") if s.labels["model"] == MODEL]
        assert len(series) == 1 and series[0].labels["replica"], name
    assert after.total("ray_mistral_serve_engine_running_requests", model=MODEL) == 0
    in_flight = [
        s for s in after.series("ray_mistral_serve_requests_in_flight") if s.labels["model"] == MODEL
    ]
    assert in_flight and sum(s.value for s in in_flight) == 0


def test_vllm_engine_metrics_reach_ray(traffic: dict[str, Any]) -> None:
    after: Scrape = traffic["after"]
    ttft = [
        s
        for s in after.series("ray_vllm_time_to_first_token_seconds_count")
        if s.labels["model_name"] == MODEL
    ]
    assert ttft and sum(s.value for s in ttft) >= 3
    assert _delta(traffic, VLLM_TOKENS, model_name=MODEL) >= traffic["completion_tokens"]


WARM_TIER_METRICS = "ray_mistral_serve_model_"


def test_dashboard_queries_name_only_exported_metrics(traffic: dict[str, Any]) -> None:
    exported = traffic["after"].names()
    dashboard = load_dashboard(DEFAULT_DASHBOARD)
    used = dashboard_metric_names(dashboard)
    assert used, "the dashboard has no queries"
    # The warm tier's metrics come only from models that can sleep, which the CPU build of vLLM
    # cannot (tests/unit/test_dashboard.py holds those names to serve_app/serving/telemetry.py).
    used = {name for name in used if not name.startswith(WARM_TIER_METRICS)}
    missing = sorted(used - exported)
    assert not missing, f"the dashboard reads metrics the app does not export: {missing}"


def test_ray_dashboard_shows_the_application(local_app: RunningApp) -> None:
    resp = httpx.get(f"{local_app.dashboard_url}/api/serve/applications/", headers=auth_headers(), timeout=30)
    assert resp.status_code == 200
    app = resp.json()["applications"][APP_NAME]
    assert app["status"] == "RUNNING"
    deployments = app["deployments"]
    expected = {m.deployment_name for m in local_app.config.models} | {"OpenAIIngress"}
    assert expected <= deployments.keys()
    for name in expected:
        assert deployments[name]["status"] == "HEALTHY", (name, deployments[name]["status"])
        assert any(r["state"] == "RUNNING" for r in deployments[name]["replicas"])


def _log_lines(session_dir: Path, needle: str) -> list[tuple[str, str]]:
    """(file name, line) of every line of Ray's logs (this session) holding `needle`."""
    found = []
    for path in (session_dir / "logs").rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    found.append((path.name, line))
    return found


def test_request_id_is_kept_and_logged_without_the_prompt(local_app: RunningApp) -> None:
    request_id = f"obs-{uuid.uuid4().hex}"
    secret = f"secret-{uuid.uuid4().hex}"
    body = {**_chat(4), "messages": [{"role": "user", "content": f"remember {secret}"}]}
    resp = httpx.post(
        f"{local_app.url}/v1/chat/completions", json=body, headers={"X-Request-Id": request_id}, timeout=60
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == request_id
    assert request_id in resp.json()["id"]  # the engine's request id

    def access_lines() -> list[dict[str, Any]]:
        lines = _log_lines(local_app.session_dir, request_id)
        return [json.loads(line) for _, line in lines if line.startswith("{")]

    entries = wait_for_value(access_lines)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["model"] == MODEL and entry["status"] == 200 and entry["route"] == "chat"
    assert entry["completion_tokens"] == 4 and entry["prompt_tokens"] > 0
    assert entry["cancelled"] is False and entry["duration_s"] > 0
    assert "request" not in entry and "response" not in entry

    # Ray Serve's own log lines of both hops (ingress and model replica) carry the id too;
    # each replica writes its file on its own schedule.
    def hops() -> set[str]:
        files = {name for name, _ in _log_lines(local_app.session_dir, request_id)}
        ingress = any(name.startswith("replica_mistral_OpenAIIngress") for name in files)
        model = any(name.startswith(f"replica_mistral_{MODEL}") for name in files)
        return files if ingress and model else set()

    assert wait_for_value(hops), {name for name, _ in _log_lines(local_app.session_dir, request_id)}
    assert not _log_lines(local_app.session_dir, secret), "prompt text reached the logs"


def wait_for_value(read: Any, timeout_s: float = 15.0) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value
