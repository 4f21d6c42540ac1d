"""The cluster configs in cluster/ stay in step with the package, and Ray and KubeRay can read them.

No Docker engine runs in CI, so the image of cluster/Dockerfile is not built: these tests read the
files. The launcher config goes through Ray's own config validation and the RayService's cluster
through the translation Ray's autoscaler applies to a KubeRay cluster; nothing starts Ray.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.serve import Application

from serve_app.config import BUILDER_IMPORT_PATH, load_app_config, load_serve_file
from serve_app.serving.builder import build_app
from serve_app.serving.server import ModelServer
from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

CLUSTER = ROOT / "cluster"
PRODUCTION = ROOT / "configs/production.yaml"


# ---------------------------------------------------------------------------------------------
# Readers


def _read_yaml(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_ray() -> Requirement:
    reqs = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]
    (ray_req,) = [r for r in reqs if r.name == "ray"]
    return ray_req


def _pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not a pin"
    return spec.version


def _makefile_gpu_vllm_spec() -> Requirement:
    """VLLM_SPEC of the Makefile's `ifeq ($(HAS_GPU),1)` branch."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "") == "ifeq($(HAS_GPU),1)")
    for line in lines[start + 1 :]:
        if line.strip() in ("else", "endif"):
            break
        match = re.fullmatch(r"\s*VLLM_SPEC\s*\?=\s*(.+?)\s*", line)
        if match:
            return Requirement(match.group(1))
    raise AssertionError("no VLLM_SPEC in the Makefile's GPU branch")


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (CLUSTER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _docker_from() -> str:
    """The first FROM's image, with the ARGs declared before it substituted."""
    args: dict[str, str] = {}
    for keyword, rest in _dockerfile():
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip("\"'")
        elif keyword == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
    raise AssertionError("the Dockerfile has no FROM")


def _shell_commands(run: str) -> Iterator[list[str]]:
    """The simple commands of a RUN line, split on && and ;."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in lexer:
        if token in ("&&", ";", "||"):
            if command:
                yield command
            command = []
        else:
            command.append(token)
    if command:
        yield command


def _pip_installs() -> list[tuple[int, list[str]]]:
    """(instruction index, positional arguments) of every `pip install` in a RUN."""
    found = []
    for index, (keyword, rest) in enumerate(_dockerfile()):
        if keyword != "RUN":
            continue
        for command in _shell_commands(rest):
            for i in range(len(command) - 1):
                if command[i] == "pip" and command[i + 1] == "install":
                    found.append((index, [t for t in command[i + 2 :] if not t.startswith("-")]))
    return found


def _launcher_config() -> dict[str, Any]:
    """ray-cluster.yaml as `ray up` sees it: merged with the AWS defaults and validated by Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_read_yaml("ray-cluster.yaml")))
    validate_config(config)
    return config


def _kuberay_autoscaling_config() -> dict[str, Any]:
    """The RayService's cluster as Ray's autoscaler reads it on KubeRay (it validates it too)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    spec = _read_yaml("rayservice.yaml")["spec"]["rayClusterConfig"]
    return _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "mistral-serve", "namespace": "default"}, "spec": spec}
    )


def _serve_config() -> dict[str, Any]:
    text = _read_yaml("rayservice.yaml")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    config = yaml.safe_load(text)
    assert isinstance(config, dict)
    return config


def _ray_start_flags(commands: list[str]) -> dict[str, str]:
    """The flags of the `ray start` in a list of launcher commands."""
    starts = [cmd for line in commands for cmd in _shell_commands(line) if cmd[:2] == ["ray", "start"]]
    assert len(starts) == 1, f"expected one `ray start` in {commands}"
    flags: dict[str, str] = {}
    tokens = starts[0][2:]
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
            flags[name] = value
    return flags


def _rayservice_groups() -> list[tuple[str, dict[str, Any]]]:
    cluster = _read_yaml("rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return groups


def _gpu_limit(group: dict[str, Any]) -> int:
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_launcher_config_passes_rays_validation() -> None:
    config = _launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["min_workers"] == head["max_workers"] == 0

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no GPU worker node type"
    for name, node_type in gpu_workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["max_workers"] >= 1, name
        assert node_type["resources"].get("CPU", 0) >= 1, f"{name}: say how many CPUs it has"
    # The global cap must not hide capacity that the node types promise.
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    assert config["upscaling_speed"] > 0
    assert config["idle_timeout_minutes"] > 0

    # Everything is in the image: no setup command installs Ray (Ray's defaults would).
    setup = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
    assert not [c for c in setup if "pip install" in c and "ray" in c], setup


def test_launcher_runs_the_image_with_gpus_on_workers_only() -> None:
    docker = _read_yaml("ray-cluster.yaml")["docker"]
    assert docker["image"]
    assert "--ipc=host" in docker["run_options"]
    # `docker run --gpus all` fails on a node without GPUs, such as the head.
    assert "--gpus all" in docker["worker_run_options"]
    assert "--gpus all" not in docker["run_options"] + docker.get("head_run_options", [])


def test_launcher_dashboard_listens_on_loopback_only() -> None:
    config = _read_yaml("ray-cluster.yaml")
    head = _ray_start_flags(config["head_start_ray_commands"])
    assert "--head" in head
    assert head["--dashboard-host"] == "127.0.0.1"
    assert head["--autoscaling-config"] == "~/ray_bootstrap_config.yaml"
    worker = _ray_start_flags(config["worker_start_ray_commands"])
    assert worker["--address"] == "$RAY_HEAD_IP:6379"
    assert "--dashboard-host" not in worker


def test_launcher_uses_token_auth_and_no_secret_in_the_file() -> None:
    config = _read_yaml("ray-cluster.yaml")
    options = config["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    assert "~/.ray/auth_token" in config["file_mounts"]
    # The Hugging Face token arrives as a mounted file, never as a value written here.
    assert "~/.cache/huggingface/token" in config["file_mounts"]
    everything = json.dumps(config)
    assert not re.search(r"(HF_TOKEN|RAY_AUTH_TOKEN)=", everything)


# ---------------------------------------------------------------------------------------------
# KubeRay RayService


def test_rayservice_structure() -> None:
    service = _read_yaml("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1"
    assert service["kind"] == "RayService"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _pinned_version(_pyproject_ray())
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Default"
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["authOptions"]["mode"] == "token"

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # The head Service carries the dashboard: it must stay inside the Kubernetes cluster.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert _gpu_limit(head) == 0

    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpu_limit(g) >= 1]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        name = group["groupName"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1, name
        assert int(group["rayStartParams"]["num-gpus"]) == _gpu_limit(group), name
        requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert int(requests["nvidia.com/gpu"]) == _gpu_limit(group), name


@pytest.mark.parametrize("group_name", [name for name, _ in _rayservice_groups()])
def test_rayservice_pods_have_shared_memory(group_name: str) -> None:
    group = dict(_rayservice_groups())[group_name]
    pod = group["template"]["spec"]
    memory_volumes = {
        v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"
    }
    mounts = pod["containers"][0].get("volumeMounts", [])
    assert [m for m in mounts if m["mountPath"] == "/dev/shm" and m["name"] in memory_volumes]


def test_rayservice_takes_hf_token_from_a_secret() -> None:
    for name, group in _rayservice_groups():
        for container in group["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if "TOKEN" in env["name"]:
                    assert "value" not in env, f"{name}: {env['name']} written in the manifest"
                    assert env["valueFrom"]["secretKeyRef"]["name"], name
    for name, group in _rayservice_groups():
        if _gpu_limit(group) >= 1:
            env = {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"], name


def test_rayservice_cluster_as_rays_autoscaler_reads_it() -> None:
    config = _kuberay_autoscaling_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert "GPU" not in head["resources"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)


# ---------------------------------------------------------------------------------------------
# The Serve application of the RayService and configs/production.yaml


def test_serve_config_equals_production() -> None:
    config = _serve_config()
    apps = config["applications"]
    assert len(apps) == 1
    assert apps[0]["import_path"] == BUILDER_IMPORT_PATH
    production = yaml.safe_load(PRODUCTION.read_text())
    assert apps[0]["args"] == production["applications"][0]["args"], (
        "cluster/rayservice.yaml's serveConfigV2 serves other models than configs/production.yaml"
    )
    assert config == production, "serveConfigV2 differs from configs/production.yaml"


def test_serve_config_builds_with_our_builder() -> None:
    args = _serve_config()["applications"][0]["args"]
    app = build_app(args)  # validates every model's engine arguments with vLLM
    assert isinstance(app, Application)
    assert not ray.is_initialized()
    production = load_app_config(load_serve_file(PRODUCTION).args)
    assert [m.id for m in load_app_config(args).models] == [m.id for m in production.models]


def _replicas(args: dict[str, Any]) -> list[tuple[str, dict[str, float], int]]:
    """(name, resources of one replica, most replicas) of each deployment the app asks for."""
    config = load_app_config(args)
    found = []
    for model in config.models:
        options = ModelServer.get_deployment_options(model)
        actor = options["ray_actor_options"]
        count = options.get("num_replicas") or options["autoscaling_config"]["max_replicas"]
        found.append((model.id, {"CPU": actor["num_cpus"], "GPU": actor["num_gpus"]}, count))
    ingress = config.ingress
    found.append(("ingress", {"CPU": ingress.num_cpus, "GPU": 0.0}, ingress.num_replicas))
    return found


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0) >= v for k, v in need.items() if v)


CLUSTERS = {"ray-cluster.yaml": _launcher_config, "rayservice.yaml": _kuberay_autoscaling_config}


@pytest.mark.parametrize("cluster", list(CLUSTERS))
def test_every_replica_fits_a_worker_type(cluster: str) -> None:
    config = CLUSTERS[cluster]()
    types = config["available_node_types"]
    workers = [t["resources"] for n, t in types.items() if n != config["head_node_type"] and t["max_workers"]]
    for name, need, _ in _replicas(_serve_config()["applications"][0]["args"]):
        assert any(_fits(need, r) for r in workers), (
            f"{cluster}: no worker type holds a {name} replica {need}"
        )


@pytest.mark.parametrize("cluster", list(CLUSTERS))
def test_cluster_holds_the_application_at_its_largest(cluster: str) -> None:
    """First-fit decreasing packing of every deployment at its max_replicas onto the most nodes."""
    config = CLUSTERS[cluster]()
    types = config["available_node_types"]
    left = {n: t["max_workers"] for n, t in types.items() if n != config["head_node_type"]}
    by_size = sorted(left, key=lambda n: (types[n]["resources"].get("GPU", 0), types[n]["resources"]["CPU"]))
    nodes = [dict(types[config["head_node_type"]]["resources"])]
    items = [
        (name, need)
        for name, need, count in _replicas(_serve_config()["applications"][0]["args"])
        for _ in range(count)
    ]
    for name, need in sorted(items, key=lambda item: (item[1]["GPU"], item[1]["CPU"]), reverse=True):
        node = next((n for n in nodes if _fits(need, n)), None)
        if node is None:
            node_type = next((t for t in by_size if left[t] and _fits(need, types[t]["resources"])), None)
            assert node_type, f"{cluster}: no room for another {name} replica at full scale"
            left[node_type] -= 1
            node = dict(types[node_type]["resources"])
            nodes.append(node)
        for key, value in need.items():
            node[key] = node.get(key, 0) - value
    assert len(nodes) - 1 <= config["max_workers"]


# ---------------------------------------------------------------------------------------------
# The image


def test_dockerfile_base_is_vllm_in_the_makefiles_gpu_range() -> None:
    image = _docker_from()
    match = re.fullmatch(r"vllm/vllm-openai:v(.+)", image)
    assert match, f"FROM {image}: expected vLLM's official image vllm/vllm-openai:v<version>"
    spec = _makefile_gpu_vllm_spec()
    assert spec.name == "vllm"
    assert spec.specifier.contains(Version(match.group(1))), f"{image} is outside the Makefile's {spec}"


def test_dockerfile_pins_pyprojects_ray() -> None:
    pins = [
        Requirement(arg)
        for _, args in _pip_installs()
        for arg in args
        if re.match(r"ray\b", arg) and Requirement(arg).name == "ray"
    ]
    assert len(pins) == 1, pins
    expected = _pyproject_ray()
    assert (pins[0].name, pins[0].extras, str(pins[0].specifier)) == (
        expected.name,
        expected.extras,
        str(expected.specifier),
    )


def test_dockerfile_installs_the_package() -> None:
    instructions = _dockerfile()
    installs = [index for index, args in _pip_installs() if "." in args]
    assert installs, "no `pip install .` of the package"
    copied_before: set[str] = set()
    for keyword, rest in instructions[: installs[0]]:
        if keyword == "COPY":
            *sources, _ = rest.split()
            copied_before.update(s.rstrip("/") for s in sources if not s.startswith("--"))
    readme = _pyproject()["project"]["readme"]
    for needed in ("pyproject.toml", readme, "serve_app", "configs"):
        assert needed in copied_before, f"{needed} is not copied before `pip install .`"
    workdirs = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"


def test_dockerfile_resets_the_vllm_entrypoint_and_holds_no_secret() -> None:
    instructions = _dockerfile()
    entrypoints = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == []
    for keyword, rest in instructions:
        if keyword in ("ENV", "ARG"):
            assert "TOKEN" not in rest.upper(), f"{keyword} {rest}: secrets end up in the image"


def test_both_configs_run_the_same_image() -> None:
    docker = _read_yaml("ray-cluster.yaml")["docker"]
    launcher_images = {docker["image"], docker.get("head_image", docker["image"])}
    launcher_images.add(docker.get("worker_image", docker["image"]))
    service_images = {
        container["image"]
        for _, group in _rayservice_groups()
        for container in group["template"]["spec"]["containers"]
    }
    assert launcher_images == service_images
    (image,) = launcher_images
    name, _, tag = image.rpartition(":")
    assert name.endswith("/mistral-serve")
    assert tag == _pyproject()["project"]["version"]
