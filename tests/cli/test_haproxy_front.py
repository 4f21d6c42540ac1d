"""`serve_app run --front haproxy`: HAProxy in front of ingress replicas that serve HTTP
themselves (Ray Serve's direct ingress). Streams work through it, the replicas listen on
loopback only, and Ctrl-C stops HAProxy with everything else, as does killing the command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve_app.local.launcher import free_port
from tests.cli.conftest import served

STARTUP_TIMEOUT_S = 240
DIRECT_PORTS = (30000, 31000)  # Ray Serve's RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_HTTP_PORT defaults


def _config(path: Path, port: int) -> Path:
    model = {
        "id": "echo",
        "source": "none",
        "engine": "fake",
        "num_cpus": 0,
        "num_gpus": 0,
        "engine_args": {"tokens_per_s": 200},
    }
    # One slot at 5 tokens/s: a second request waits for the first unless it was cancelled.
    slow = {
        "id": "slow",
        "source": "none",
        "engine": "fake",
        "num_cpus": 0,
        "num_gpus": 0,
        "engine_args": {"tokens_per_s": 5, "max_num_seqs": 1},
        "deployment": {"num_replicas": 1, "max_ongoing_requests": 1},
    }
    serve_file = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "mistral",
                "route_prefix": "/",
                "import_path": "serve_app.serving.builder:build_app",
                "args": {"models": [model, slow], "ingress": {"num_replicas": 2, "num_cpus": 0}},
            }
        ],
    }
    path.write_text(yaml.safe_dump(serve_file))
    return path


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    found = []
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.append((conn.laddr.ip, conn.laddr.port))
    return found


def test_haproxy_front_streams_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path / "serve.yaml", port)
    command = [sys.executable, "-m", "serve_app", "run", str(config), "--front", "haproxy", "--no-dashboard"]
    with served(command, STARTUP_TIMEOUT_S) as run:
        assert "haproxy front" in run.output and "8404" in run.output, run.output  # the open ports are told

        body = {
            "model": "echo",
            "messages": [{"role": "user", "content": "one two three four five six"}],
            "max_tokens": 6,
            "stream": True,
        }
        events = []
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json=body,
            headers={"X-Request-Id": "front-check-1"},
            timeout=60,
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
        assert events[-1] == "[DONE]", events
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text.strip(), chunks
        assert all(c["id"].endswith("front-check-1") for c in chunks), chunks[0]["id"]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert models.status_code == 200 and {m["id"] for m in models.json()["data"]} == {"echo", "slow"}

        # A client that leaves mid-stream frees its engine slot through HAProxy too.
        long = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={**long, "stream": True}, timeout=60
        ) as resp:
            assert resp.status_code == 200
            for n, _ in enumerate(resp.iter_lines()):
                if n >= 2:
                    break  # leave after the first events: 100 tokens would take 20 s
        started = time.monotonic()
        short = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json={**long, "max_tokens": 2}, timeout=60
        )
        assert short.status_code == 200, short.text
        assert time.monotonic() - started < 8, "the abandoned stream still held the only slot"

        seen = run.look()
        haproxy = {pid for pid, cmd in seen.items() if "haproxy" in cmd.split(" ")[0]}
        assert haproxy, seen
        assert ("127.0.0.1", port) in _listening(haproxy), _listening(haproxy)
        # Both ingress replicas serve HTTP themselves (on ports of Serve's direct-ingress
        # range), on loopback only, as http_options.host says. Their other listeners are
        # Ray's worker and inter-deployment gRPC servers, behind Ray's token authentication.
        ingress = {pid for pid, cmd in seen.items() if "OpenAIIngress" in cmd}
        direct = [(ip, p) for ip, p in _listening(ingress) if DIRECT_PORTS[0] <= p < DIRECT_PORTS[1]]
        assert len(direct) == 2, _listening(ingress)
        assert all(ip == "127.0.0.1" for ip, _ in direct), direct


def test_a_killed_run_leaves_no_haproxy_behind(tmp_path: Path) -> None:
    """Killing `run` outright takes Ray's processes with it (Ray ties them to their driver),
    but not HAProxy, which a Ray worker starts: the run's sidecar must stop it."""
    port = free_port()
    config = _config(tmp_path / "serve.yaml", port)
    command = [sys.executable, "-m", "serve_app", "run", str(config), "--front", "haproxy", "--no-dashboard"]
    with served(command, STARTUP_TIMEOUT_S, kill=True) as run:
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert models.status_code == 200
        time.sleep(3)  # HAProxy reloads as replicas come up: see the last one
        seen = run.look()
        assert any("haproxy" in cmd.split(" ")[0] for cmd in seen.values()), seen
    # `served` checked that nothing it saw outlived the command; the port is closed too.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
