"""`serve_app run` starts a Ray of its own and never touches a cluster it did not start.

A cluster started with `ray start --head` on the same machine, with a Serve application of its
own, is named in `RAY_ADDRESS` (where `ray.init()` would attach to it). `run` must start its own
Ray beside it, and stopping `run` must leave that cluster and its application serving.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve_app.local.launcher import free_port
from tests.cli.conftest import served

STARTUP_TIMEOUT_S = 240
# Token authentication as Ray 2.60 uses it for a local cluster (the token in ~/.ray/auth_token).
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}

THEIR_APP = textwrap.dedent(
    """
    import sys
    import ray
    from ray import serve

    @serve.deployment
    class Theirs:
        def __call__(self, request):
            return "theirs"

    ray.init(address=sys.argv[1], log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
    serve.run(Theirs.bind(), name="theirs", route_prefix="/theirs")
    """
)


@pytest.fixture
def their_cluster() -> Iterator[tuple[str, int, int]]:
    """A Ray cluster of `ray start --head` serving an application of its own: (address, its
    GCS server's pid, its Serve HTTP port)."""
    port, http_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-theirs-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **RAY_ENV},
    )
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(
            [sys.executable, "-c", THEIR_APP, address, str(http_port)],
            check=True,
            timeout=180,
            env={**os.environ, **RAY_ENV},
            capture_output=True,
        )
        gcs = [p.pid for p in psutil.Process(head.pid).children(recursive=True) if "gcs_server" in p.name()]
        assert len(gcs) == 1, "their cluster has no GCS server"
        yield address, gcs[0], http_port
    finally:
        # Every process of that cluster at once (`ray stop` would stop every Ray on the machine).
        tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        head.wait()


def _theirs(http_port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{http_port}/theirs", timeout=10).text


def test_run_starts_its_own_ray_beside_a_running_cluster(
    tmp_path: Path, their_cluster: tuple[str, int, int]
) -> None:
    address, their_gcs, their_http = their_cluster
    assert _theirs(their_http) == "theirs"
    port = free_port()
    model = {"id": "echo", "source": "none", "engine": "fake", "num_cpus": 0, "num_gpus": 0}
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "http_options": {"host": "127.0.0.1", "port": port},
                "applications": [
                    {
                        "name": "mistral",
                        "import_path": "serve_app.serving.builder:build_app",
                        "args": {"models": [model], "ingress": {"num_cpus": 0}},
                    }
                ],
            }
        )
    )
    command = [sys.executable, "-m", "serve_app", "run", str(config), "--no-dashboard"]
    with served(command, STARTUP_TIMEOUT_S, env={"RAY_ADDRESS": address, **RAY_ENV}) as run:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert (
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).status_code
            == 200
        )
        ours = [cmd for cmd in run.look().values() if "gcs_server" in cmd]
        assert ours, "run attached to the running cluster instead of starting its own Ray"
        assert _theirs(their_http) == "theirs"
    # `served` checked that Ctrl-C stopped everything run started; theirs goes on serving.
    time.sleep(2)
    assert psutil.pid_exists(their_gcs) and psutil.Process(their_gcs).status() != psutil.STATUS_ZOMBIE
    assert _theirs(their_http) == "theirs", "stopping run shut down Serve on a cluster it did not start"
