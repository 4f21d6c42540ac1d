"""`make run` serves both demo models, shows the Ray dashboard on loopback, and Ctrl-C leaves no
process behind."""

from __future__ import annotations

import re

import httpx

from serve_app.local.launcher import free_port
from serve_app.local.ray_token import auth_headers
from tests.cli.conftest import served

STARTUP_TIMEOUT_S = 420


def test_make_run_serves_both_models_and_ctrl_c_stops_everything() -> None:
    port = free_port()
    with served(["make", "--no-print-directory", "run", f"RUN_ARGS=--port {port}"], STARTUP_TIMEOUT_S) as run:
        assert f"Serving on http://127.0.0.1:{port}" in run.output
        assert "replicas ready" in run.output  # progress was shown while engines loaded
        for model in ("tiny-mistral-v3", "tiny-mistral-tekken"):
            resp = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
                timeout=60,
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 3
        # The Ray dashboard runs by default, on loopback, and lists the application.
        found = re.search(
            r"Ray dashboard: (http://127\.0\.0\.1:\d+) \(sign in with the token in (\S+)", run.output
        )
        assert found, run.output
        apps = httpx.get(f"{found[1]}/api/serve/applications/", headers=auth_headers(), timeout=30)
        assert apps.status_code == 200 and "mistral" in apps.json()["applications"], apps.text
        seen = run.look()
        assert any("EngineCore" in c for c in seen.values()), seen
        assert any("raylet" in c for c in seen.values()), seen
    # `served` checked that Ctrl-C stopped everything; the port is closed too.
    with httpx.Client() as client:
        try:
            client.get(f"http://127.0.0.1:{port}/health", timeout=2)
            raise AssertionError("the server still answers after Ctrl-C")
        except httpx.TransportError:
            pass
