"""LoRA adapters on Ray: two replicas of a model, two ingress replicas, eight adapters. Each
replica loads an adapter on its first request there, holds at most its cap (evicting the least
recently used), and Serve's routers, told by the replicas what they hold, send each adapter's
requests to a replica that holds it. The cache, the ranking and the checks are tested without
Ray in tests/unit/test_adapters.py."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from serve_app.tools.load import CHAT, Call, send_one
from tests.cluster.conftest import APP, deploy
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("gpu_cluster")

ADAPTERS = ROOT / "models" / "adapters"


def lora_model(model_id: str, per_replica: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "source": "none",
        "engine": "fake",
        "num_gpus": 0,
        "num_cpus": 0.1,
        "engine_args": {"ttft_s": 0.01, "tokens_per_s": 500, "adapter_load_s": 0.05},
        "lora": {
            "max_loras": 2,
            "max_lora_rank": 8,
            "max_adapters_per_replica": per_replica,
            "check_base_name": False,
        },
        "adapters": [
            {"name": f"{model_id}-{i}", "source": str(ADAPTERS / f"tiny-mistral-v3-lora-{i}")}
            for i in range(8)
        ],
        "deployment": {"num_replicas": 2},
    }


def ask(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    result = send_one(url, Call(CHAT, body, keep_text=True))
    assert result.complete, result.error
    return result.text


def replicas(model_id: str) -> dict[str, dict[str, Any]]:
    """What each replica of the model holds and counted (asked until both answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(model_id, app_name=APP)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(64):
        state = handle.adapters.remote().result(timeout_s=30)
        seen[state["replica"]] = state
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only {len(seen)} replica(s) answered")


def traffic(url: str, names: list[str], rounds: int, seed: int) -> None:
    """Every adapter `rounds` times in a random order, two requests at a time; each answer is
    its own adapter's."""
    order = [name for _ in range(rounds) for name in random.Random(seed).sample(names, len(names))]
    with ThreadPoolExecutor(2) as pool:
        for name, text in zip(order, pool.map(lambda n: ask(url, n), order), strict=True):
            assert text.startswith(f"{name}-tok0"), (name, text)


def test_adapters_load_on_demand_and_their_requests_go_to_the_replicas_holding_them(url: str) -> None:
    deploy([lora_model("roomy", 4), lora_model("tight", 2)], ingress={"num_replicas": 2})
    roomy = [f"roomy-{i}" for i in range(8)]
    for name in roomy:  # first requests: each adapter loads on one replica
        assert ask(url, name).startswith(f"{name}-tok0")
    time.sleep(2)  # the replicas' reports reach the routers of both ingress replicas
    before = replicas("roomy")
    traffic(url, roomy, rounds=4, seed=1)
    after = replicas("roomy")
    held = sum(after[r]["requests"]["held"] - before[r]["requests"]["held"] for r in after)
    loaded = sum(after[r]["requests"]["loaded"] - before[r]["requests"]["loaded"] for r in after)
    # 8 adapters, room for 4 on each replica: once placed, nearly every request finds its adapter.
    assert held / (held + loaded) >= 0.9, (held, loaded, after)
    assert all(len(state["held"]) <= 4 for state in after.values())

    # More adapters than the replicas hold (8 for 2 x 2): loads and evictions, never a wrong answer.
    tight = [f"tight-{i}" for i in range(8)]
    traffic(url, tight, rounds=2, seed=2)
    states = replicas("tight")
    assert all(len(state["held"]) <= 2 and not state["requests"]["failed"] for state in states.values())
    assert sum(state["requests"]["loaded"] for state in states.values()) > 4  # evicted ones came back
