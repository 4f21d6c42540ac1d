"""The real app on a private local Ray: real Ray Serve, real vLLM CPU engines, both demo models."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_app.config import AppConfig, KeySources, load_app_config, load_serve_file
from serve_app.engine.protocol import EngineStats
from serve_app.guards.auth import hash_key
from serve_app.local.launcher import LocalServe, free_port
from tests.conftest import ROOT

APP_NAME = "mistral"


@dataclass(frozen=True)
class RunningApp:
    url: str
    config: AppConfig
    session_dir: Path  # Ray's session directory (logs/ holds every process's logs)
    dashboard_url: str

    def metrics_urls(self) -> list[str]:
        """Ray's Prometheus endpoint on each node."""
        import ray

        return [
            f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes()
            if node["Alive"]
        ]

    def engine_stats(self, model_id: str) -> int:
        """Requests the model's engine holds right now (its only replica)."""
        return self.engine_load(model_id).in_flight

    def engine_load(self, model_id: str) -> EngineStats:
        """The load of the model's engine right now (its only replica)."""
        from ray import serve

        model = self.config.find(model_id)
        assert model is not None
        handle = serve.get_deployment_handle(model.deployment_name, APP_NAME)
        stats: EngineStats = handle.engine_stats.remote().result(timeout_s=10)
        return stats


TWO_FRONTENDS = "tiny-mistral-v3"
ADMIN_KEY = "serve-tests-admin-key"


@pytest.fixture(scope="package")
def local_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """configs/local.yaml served on a free loopback port by the launcher `serve_app run` uses;
    stopped with every process it made.

    The v3 model's engine is served by two frontend processes (serve_app.engine.vllm.frontends),
    so that this suite, the conformance with `vllm serve` included, runs that path; the Tekken
    model's replica runs its engine itself, as the demo does (one frontend)."""
    from serve_app.serving.builder import build_openai_app

    config = load_app_config(load_serve_file(ROOT / "configs/local.yaml").args, base_dir=ROOT)
    models = tuple(
        m.model_copy(update={"frontends": 2}) if m.id == TWO_FRONTENDS else m for m in config.models
    )
    # The admin routes on, with a key of their own (tests/serve/test_adapters.py).
    auth = config.auth.model_copy(update={"admin": KeySources(api_keys=(hash_key(ADMIN_KEY),))})
    # Batches kept in a directory of this run's (tests/serve/test_batches.py).
    batches = config.batches.model_copy(update={"store": str(tmp_path_factory.mktemp("batches"))})
    config = config.model_copy(update={"models": models, "auth": auth, "batches": batches})
    # Metrics reach Ray's endpoint within a second (default 10 s), for the observability tests.
    metrics_env = {"RAY_metrics_report_interval_ms": "1000"}
    with LocalServe(dashboard_port=free_port(), env=metrics_env) as local:
        local.deploy(build_openai_app(config), APP_NAME)
        assert local.session_dir is not None and local.dashboard_url is not None
        yield RunningApp(
            url=local.url, config=config, session_dir=local.session_dir, dashboard_url=local.dashboard_url
        )


IDLE_WITHIN_S = 5.0


@pytest.fixture(autouse=True)
def engines_left_idle(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test on the shared app, its engines hold no request within `IDLE_WITHIN_S`:
    a request that outlives its test (a cancellation lost on the way) fails that test, not
    whichever test next expects an idle engine."""
    yield
    if "local_app" not in request.fixturenames:
        return
    app: RunningApp = request.getfixturevalue("local_app")
    deadline = time.monotonic() + IDLE_WITHIN_S
    for model in app.config.models:
        while (held := app.engine_load(model.id)).in_flight:
            assert time.monotonic() < deadline, (
                f"{model.id}'s engine still holds {held} {IDLE_WITHIN_S} s after the test"
            )
            time.sleep(0.05)


def long_chat(model: str, stream: bool = True) -> dict[str, object]:
    """A chat request far longer than any test waits for: it ends when its client leaves."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": stream,
    }


@contextmanager
def streams_held(url: str, model: str, count: int) -> Iterator[None]:
    """`count` long streams, each generating (its first event read) while the block runs; on
    leaving it, every client closes its connection mid-stream at once."""
    opened = threading.Barrier(count + 1)
    leave = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long_chat(model), timeout=120) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # keep it: a dropped iterator closes the connection
            next(lines)  # generating
            opened.wait()
            leave.wait()
        # leaving the block closes the connection mid-stream

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(stream) for _ in range(count)]
        try:
            opened.wait(timeout=120)
            yield
        finally:
            leave.set()
        for f in futures:
            f.result()
