"""The HTTP front: the variables each sets, and the cluster manifests carrying the default."""

from __future__ import annotations

import importlib
import os

import pytest
import yaml

from serve_app.local.front import DEFAULT_FRONT, FRONTS, LOCAL_SETTINGS, front_variables
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for variables in [*FRONTS.values(), *LOCAL_SETTINGS.values()]:
        for name in variables:
            monkeypatch.delenv(name, raising=False)


def test_each_front_sets_its_variables() -> None:
    assert front_variables("proxy") == {
        "RAY_SERVE_PROXY_USE_GRPC": "1",
        # a response larger than Serve's 4 MiB message bound passes the proxy
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "1073741824",
    }
    assert front_variables("haproxy") == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # a local stop is not held for a cluster's deregistration window (30 s)
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def test_an_operators_own_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    assert front_variables("proxy") == {
        "RAY_SERVE_PROXY_USE_GRPC": "0",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "1073741824",
    }
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    assert front_variables("haproxy")["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def test_serve_still_bounds_a_replicas_grpc_messages_at_4_mib() -> None:
    """The proxy front raises the bound because Serve's default is 4 MiB; once a release
    changes it, this fails: see whether FRONTS still needs the variable."""
    from ray.serve._private import constants

    assert "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH" not in os.environ  # read at import: again
    assert importlib.reload(constants).RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH == 4 * 2**20


def test_an_unknown_front_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown front 'nginx'"):
        front_variables("nginx")


def test_cluster_manifests_run_the_default_front() -> None:
    wanted = FRONTS[DEFAULT_FRONT]
    launcher = yaml.safe_load((ROOT / "cluster/ray-cluster.yaml").read_text())
    options = launcher["docker"]["run_options"]
    for name, value in wanted.items():
        assert f"--env {name}={value}" in options
    service = yaml.safe_load((ROOT / "cluster/rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for name, value in wanted.items():
                assert env.get(name) == value, (container["name"], env)
