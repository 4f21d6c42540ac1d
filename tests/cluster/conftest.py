"""A multi-node Ray cluster on one machine, grown by Ray's own autoscaler.

Ray's fake multi-node provider (`ray.cluster_utils.AutoscalingCluster`, provider type
`fake_multinode`) launches "GPU nodes" on demand: each is a real raylet on this machine
that declares one logical GPU. Ray's wheel lacks the provider's `example.yaml`, so the base
cluster config is written here.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from serve_app.local.processes import kill_leftovers

# What Ray's missing fake_multi_node/example.yaml holds: a cluster config with no setup steps.
BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 2.0,
    "idle_timeout_minutes": 0.25,
    "docker": {},
    "auth": {"ssh_user": "ubuntu"},
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}

GPU_NODE = "gpu_node"
APP = "scale"
# Ray 2.60 builds deployment configs by registering and unregistering modules for pickling
# by value in a process-wide set, which is not thread-safe: the sampling thread below and a
# deploy in the test thread take turns.
SERVE_API_LOCK = threading.Lock()


FIRST_MODULE = "test_warm_tier.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run FIRST_MODULE's tests before the package's others: its first test wants one GPU node
    for two replicas, and must otherwise wait for the nodes that earlier tests left idle to go
    (the autoscaler's idle timeout and more, about 40 s)."""
    here = Path(__file__).parent
    ours = [i for i, item in enumerate(items) if Path(item.path).parent == here]
    if not ours:
        return
    block = [items[i] for i in ours]
    block.sort(key=lambda item: Path(item.path).name != FIRST_MODULE)  # stable: order kept otherwise
    for i, item in zip(ours, block, strict=True):
        items[i] = item


def _autoscaling_cluster_cls() -> type:
    from ray.cluster_utils import AutoscalingCluster

    class LocalGPUCluster(AutoscalingCluster):  # type: ignore[misc]
        def _generate_config(
            self, head_resources: dict[str, Any], worker_node_types: dict[str, Any], **_: Any
        ) -> dict[str, Any]:
            import copy

            config = copy.deepcopy(BASE_CONFIG)
            config["available_node_types"] = {
                **worker_node_types,
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            }
            return config

        def shutdown(self) -> None:
            import subprocess

            subprocess.run(["ray", "stop", "--force"], check=True, capture_output=True)

    return LocalGPUCluster


@pytest.fixture(scope="package")
def gpu_cluster() -> Iterator[None]:
    """A CPU head and up to 4 one-GPU worker nodes that Ray's autoscaler adds on demand."""
    import psutil
    import ray
    from ray import serve

    # The provider and AutoscalingCluster run the `ray` command of this environment.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    before = {p.pid for p in psutil.process_iter()}
    cluster = _autoscaling_cluster_cls()(
        head_resources={"CPU": 4, "GPU": 0},
        worker_node_types={
            GPU_NODE: {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 4,
            }
        },
    )
    cluster.start()
    try:
        ray.init("auto", log_to_driver=False)
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            kill_leftovers({p.pid for p in psutil.process_iter()} - before - {os.getpid()} - _ancestors())


def _ancestors() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().parents()}


@dataclass
class ReplicaTrace:
    """Replica counts of one deployment over time, sampled from `serve.status()`."""

    deployment: str
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, running, total)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ReplicaTrace:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                with SERVE_API_LOCK:
                    status = serve.status()
                dep = status.applications[APP].deployments[self.deployment]
                running = dep.replica_states.get("RUNNING", 0)
                self.samples.append((time.monotonic(), running, sum(dep.replica_states.values())))
            except Exception:
                pass
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()

    def first(self, pred: Callable[[int, int], bool], after: float = 0.0) -> float | None:
        return next((t for t, r, n in self.samples if t >= after and pred(r, n)), None)

    def running(self) -> int:
        return self.samples[-1][1] if self.samples else 0


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="package")
def url(gpu_cluster: None) -> str:
    """Serve's HTTP proxy on the cluster, on a free loopback port."""
    from ray import serve

    from serve_app.local.launcher import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy(
    models: list[dict[str, Any]], ingress: dict[str, Any] | None = None, batch_store: Path | None = None
) -> None:
    """Run the app with these models (replacing the one before) and wait until it is ready;
    with the Batch API where `batch_store` says where it keeps its files."""
    from ray import serve

    from serve_app.config import load_app_config
    from serve_app.serving.builder import build_openai_app

    # Without a store, no Batch API: nothing written to the home directory.
    batches = {"store": str(batch_store)} if batch_store is not None else {"enabled": False}
    config = load_app_config(
        {"models": models, "ingress": {"num_cpus": 0.1, **(ingress or {})}, "batches": batches}
    )
    with SERVE_API_LOCK:
        app = build_openai_app(config)
    serve.run(app, name=APP, route_prefix="/")


def timed_chat(url: str, model: str, max_tokens: int) -> tuple[Any, float]:
    """One whole chat completion of `model` over HTTP, and the seconds its answer took."""
    import httpx

    start = time.monotonic()
    answer = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
        timeout=60,
    )
    return answer, time.monotonic() - start
