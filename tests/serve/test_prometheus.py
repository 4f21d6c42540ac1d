"""A real Prometheus server scrapes Ray's metrics endpoint while the app serves, and answers
PromQL about our metrics with the values the traffic implies.

The model is the fake engine, whose latencies are set: 0.3 s to the first token, then
50 tokens/s (0.02 s per token). The queries are the dashboard's own.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.local.launcher import free_port
from serve_app.serving.telemetry import TPOT_BUCKETS, TTFT_BUCKETS
from serve_app.tools.dashboard import DEFAULT_DASHBOARD, load_dashboard, panels, substitute
from tests.conftest import ROOT
from tests.serve.conftest import RunningApp

PREFIX = "/observed"
MODEL = "observed-fake"
TTFT_S, TOKENS_PER_S, MAX_TOKENS, REQUESTS = 0.3, 50.0, 10, 24


@pytest.fixture(scope="module")
def observed_url(local_app: RunningApp) -> Iterator[str]:
    from ray import serve

    from serve_app.config import load_app_config
    from serve_app.serving.builder import build_openai_app

    model = {
        "id": MODEL,
        "source": "none",
        "engine": "fake",
        "num_cpus": 0,
        "num_gpus": 0,
        "engine_args": {"ttft_s": TTFT_S, "tokens_per_s": TOKENS_PER_S, "max_num_seqs": 8},
        "deployment": {"num_replicas": 1},
    }
    config = load_app_config({"models": [model], "ingress": {"num_cpus": 0}, "batches": {"enabled": False}})
    serve.run(build_openai_app(config), name="observed", route_prefix=PREFIX)
    try:
        yield local_app.url + PREFIX
    finally:
        serve.delete("observed")


@pytest.fixture(scope="module")
def prometheus(local_app: RunningApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping every second the targets Ray's dashboard lists for it."""
    binary = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if not binary:
        pytest.skip("no prometheus binary (make test installs Debian's package)")
    targets = local_app.session_dir.parent / "prom_metrics_service_discovery.json"
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    file_sd_configs: [{{files: ['{targets}'], refresh_interval: 5s}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _ready(url), 30, f"Prometheus did not start: {(work / 'prometheus.log').read_text()}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check: Any, timeout_s: float, message: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, message
        time.sleep(1)
    return value


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert data["resultType"] == "vector"
    return list(data["result"])


def _value(url: str, expr: str) -> float | None:
    result = _query(url, expr)
    return float(result[0]["value"][1]) if result else None


def _stream(url: str) -> tuple[float, float]:
    """Stream one chat completion; the seconds from sending it to its first and last chunks."""
    start = time.perf_counter()
    first: float | None = None
    last = 0.0
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:"):
                last = time.perf_counter() - start
                first = last if first is None else first
    assert first is not None
    return first, last


def _quantile_bound(limits: list[float], q: float, buckets: list[float]) -> float:
    """The highest quantile `q` a histogram can report for requests whose values are at most
    `limits` (one per request): the q-th of those values is at most the q-th limit, and
    `histogram_quantile` answers within the bucket holding it."""
    nth = sorted(limits)[math.ceil(q * len(limits)) - 1]
    return min(b for b in buckets if b >= nth)


def _dashboard_expr(title: str, row: str) -> str:
    """The first query of a dashboard panel, as Grafana would send it for MODEL."""
    for panel in panels(load_dashboard(DEFAULT_DASHBOARD)):
        if panel.row == row and panel.title == title:
            return substitute(panel.targets[0][0], {"model": MODEL, "__rate_interval": "2m"})
    raise AssertionError(f"no panel {row} / {title}")


def test_prometheus_answers_with_the_values_the_traffic_implies(prometheus: str, observed_url: str) -> None:
    # Prometheus finds Ray's endpoint and scrapes it.
    _wait(lambda: _value(prometheus, 'up{job="ray"} == 1'), 60, "Prometheus never scraped Ray")
    requests = f'sum(ray_mistral_serve_requests_total{{model="{MODEL}",status="200"}})'
    tokens = f'sum(ray_mistral_serve_completion_tokens_total{{model="{MODEL}"}})'
    # One request first, scraped before the rest: a dashboard's rate() counts only what a
    # series gains after its first sample.
    seen = [_stream(observed_url)]
    _wait(lambda: _value(prometheus, requests) == 1, 60, "Prometheus never saw the first request")
    with ThreadPoolExecutor(4) as pool:
        seen += pool.map(lambda _: _stream(observed_url), range(REQUESTS - 1))
    # The gateway times each request within its client's wait, so what the clients saw bounds
    # the quantiles: a loaded machine widens the bound, wrong units or buckets still fail it.
    # Time per output token: the gateway's first chunk comes after the engine's TTFT_S, and
    # its last before the client's.
    ttft_bound = _quantile_bound([first for first, _ in seen], 0.95, TTFT_BUCKETS)
    tpot_bound = _quantile_bound([(last - TTFT_S) / (MAX_TOKENS - 1) for _, last in seen], 0.5, TPOT_BUCKETS)

    _wait(lambda: _value(prometheus, requests) == REQUESTS, 60, "Prometheus never saw all the requests")
    _wait(lambda: _value(prometheus, tokens) == REQUESTS * MAX_TOKENS, 30, "tokens counted wrong")

    # Quantiles come from histogram buckets, so they are checked against bucket bounds.
    ttft_p95 = _value(
        prometheus,
        "histogram_quantile(0.95, sum by (le) "
        f'(ray_mistral_serve_time_to_first_token_seconds_bucket{{model="{MODEL}"}}))',
    )
    assert ttft_p95 is not None and TTFT_S <= ttft_p95 <= ttft_bound, (ttft_p95, sorted(seen))
    tpot_p50 = _value(
        prometheus,
        "histogram_quantile(0.5, sum by (le) "
        f'(ray_mistral_serve_time_per_output_token_seconds_bucket{{model="{MODEL}"}}))',
    )
    assert tpot_p50 is not None and 0.015 <= tpot_p50 <= tpot_bound, (tpot_p50, sorted(seen))

    # The dashboard's own queries give the same answers.
    per_model = _query(prometheus, _dashboard_expr("Time to first token (gateway)", "Latency"))
    by_model = {r["metric"].get("model"): float(r["value"][1]) for r in per_model}
    p95 = [v for k, v in by_model.items() if k == MODEL]
    assert p95 and TTFT_S <= p95[0] <= ttft_bound, (per_model, sorted(seen))


DOCS = ROOT / "docs"


def _mixed_load(url: str, seconds: float, concurrency: int, model: str) -> None:
    """Streams of 32 tokens to `model`; every 10th request bad, every 15th left early."""
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        n = i
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                n += concurrency
                body: dict[str, Any] = {
                    "model": model,
                    "messages": [{"role": "user", "content": "Tell me about the sea."}],
                    "max_tokens": -1 if n % 10 == 0 else 32,
                    "ignore_eos": True,
                    "stream": True,
                }
                with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                    for k, _ in enumerate(resp.iter_lines()):
                        if n % 15 == 0 and k == 2:
                            break

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))


def _screenshot_serve_page(dashboard_url: str, out: Path) -> None:
    """The Ray dashboard's Serve page in headless Chromium, signed in with Ray's token."""
    from playwright.sync_api import sync_playwright

    from serve_app.local.ray_token import auth_headers

    token = auth_headers().get("Authorization", "").removeprefix("Bearer ")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            if token:
                context.add_cookies(
                    [{"name": "ray-authentication-token", "value": token, "url": dashboard_url}]
                )
            page = context.new_page()
            page.goto(f"{dashboard_url}/#/serve", wait_until="networkidle")
            page.get_by_text("OpenAIIngress").first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


@pytest.mark.skipif(
    os.environ.get("MISTRAL_SERVE_DOCS") != "1", reason="writes docs/ pictures: MISTRAL_SERVE_DOCS=1"
)
def test_docs_pictures(local_app: RunningApp, prometheus: str, observed_url: str) -> None:
    """A few minutes of mixed traffic on the demo models, then the pictures of the README:
    the dashboard's panels rendered from this Prometheus, and the Ray dashboard's Serve page."""
    from serve_app.tools.dashboard import render

    start = time.time()
    for concurrency in (2, 8, 16, 4):
        with ThreadPoolExecutor(2) as pool:
            pool.submit(_mixed_load, local_app.url, 45, concurrency, "tiny-mistral-v3")
            pool.submit(_mixed_load, local_app.url, 45, max(1, concurrency // 2), "tiny-mistral-tekken")
    time.sleep(5)
    drawn = render(
        prometheus,
        load_dashboard(DEFAULT_DASHBOARD),
        DOCS / "grafana-panels.png",
        start=start,
        end=time.time(),
        step=5,
        model_regex="tiny-mistral-v3|tiny-mistral-tekken",
        rate_interval="30s",
    )
    # The demo's CPU models cannot sleep: the warm tier's row stays empty here.
    empty = [panel.name for panel, n in drawn if n == 0 and not panel.name.startswith("Warm tier")]
    assert not empty or set(empty) <= {"Errors / Server errors (5xx)"}, empty
    _screenshot_serve_page(local_app.dashboard_url, DOCS / "ray-dashboard-serve.png")
