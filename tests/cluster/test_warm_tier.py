"""The warm tier on Ray: models of one gpu_group take turns on one (logical) GPU under alternating
traffic, an idle model sleeps, and a model that finds no room in time fails its request with a
503 and Retry-After, never a hang. The fake engine sleeps and wakes in set times; the lease book
and the tier's logic are tested without Ray in tests/unit/test_warm_tier.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from serve_app.tools.load import chat_call, send_one
from tests.cluster.conftest import APP, ReplicaTrace, deploy, timed_chat, wait_for

pytestmark = pytest.mark.usefixtures("gpu_cluster")


def shared_model(
    model_id: str, *, wake_timeout_s: float = 30, sleep_after_idle_s: float = 4
) -> dict[str, Any]:
    """A model in the group `shared`: half a GPU for Ray (two fit on one), 0.6 of its memory
    awake (one fits awake)."""
    return {
        "id": model_id,
        "source": "none",
        "engine": "fake",
        "num_gpus": 0.5,
        "num_cpus": 0.1,
        "engine_args": {"ttft_s": 0.05, "tokens_per_s": 50, "max_num_seqs": 4, "sleep_s": 0.2, "wake_s": 0.5},
        "warm_tier": {
            "sleep_after_idle_s": sleep_after_idle_s,
            "gpu_group": "shared",
            "gpu_memory_share": 0.6,
            "wake_timeout_s": wake_timeout_s,
        },
        "deployment": {"num_replicas": 1, "graceful_shutdown_timeout_s": 10},
    }


def warm_state(deployment: str) -> dict[str, Any]:
    from ray import serve

    state: dict[str, Any] = serve.get_deployment_handle(deployment, APP).warm_tier_state.remote().result()
    return state


def awake_by_gpu() -> dict[str, dict[str, str]]:
    from ray import serve

    books: dict[str, dict[str, str]] = serve.get_deployment_handle("GpuLeases", APP).awake.remote().result()
    return books


def only_the_head_node() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"]) == 1


def test_two_models_take_turns_on_one_gpu_and_every_request_is_served(url: str) -> None:
    # GPU nodes left idle by earlier tests could take one replica each: let them go first, so
    # that the autoscaler adds one node for both (two half-GPU bundles fit one GPU).
    from ray import serve

    serve.delete(APP)
    wait_for(only_the_head_node, 120, "idle GPU nodes to go")
    deploy([shared_model("left"), shared_model("right")])
    books = awake_by_gpu()
    assert len(books) == 1, books  # both replicas on the one GPU of one node
    rounds, per_round = 8, 3
    results = []
    with ThreadPoolExecutor(per_round) as pool:
        for turn in range(rounds):
            model = ("left", "right")[turn % 2]
            call = chat_call(model, "hi", 10)
            results += list(pool.map(lambda c: send_one(url, c, read_timeout_s=120), [call] * per_round))
            assert len(next(iter(awake_by_gpu().values()))) <= 1
    failed = [r for r in results if not (r.status == 200 and r.done and r.completion_tokens == 10)]
    assert not failed, failed
    left, right = warm_state("left"), warm_state("right")
    print(f"\nFIGURES warm-tier swaps: left {left}, right {right}")
    # Each turn but the first woke its model, which made the other sleep.
    assert left["wakes"] + right["wakes"] >= rounds - 1
    assert left["sleeps"]["forced"] + right["sleeps"]["forced"] >= rounds - 2
    # Idle, the awake one sleeps too.
    wait_for(
        lambda: warm_state(("left", "right")[(rounds - 1) % 2])["state"] == "asleep", 30, "an idle sleep"
    )


def test_a_model_that_finds_no_room_in_time_gets_503_with_retry_after(url: str) -> None:
    # The models before go first, with the GPU they held: deployed beside them, one of these
    # could get a GPU node of its own (and room to spare) while the other waits for theirs.
    from ray import serve

    serve.delete(APP)
    deploy([shared_model("busy", sleep_after_idle_s=60), shared_model("late", wake_timeout_s=1)])
    books = awake_by_gpu()
    assert len(books) == 1, books  # both replicas on the one GPU of one node
    wait_for(
        lambda: warm_state("late")["state"] == "asleep" or warm_state("busy")["state"] == "asleep",
        30,
        "a sleep",
    )
    long_call = chat_call("busy", "hi", 200)  # 4 s of tokens: busy keeps its room meanwhile
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(send_one, url, long_call, None, 120)
        wait_for(
            lambda: warm_state("busy")["state"] == "awake" and warm_state("late")["state"] == "asleep",
            30,
            "busy awake",
        )
        time.sleep(0.5)
        answer, waited = timed_chat(url, "late", 5)
        assert answer.status_code == 503, answer.text
        assert answer.headers.get("retry-after")
        assert "could not wake" in answer.json()["error"]["message"]
        assert waited < 10
        busy = long.result()
    assert busy.status == 200 and busy.done and busy.completion_tokens == 200


def test_an_idle_model_sleeps_then_is_removed_and_comes_back(url: str) -> None:
    model = shared_model("idle", sleep_after_idle_s=1)
    model["warm_tier"].pop("gpu_group")  # alone on its GPU: no lease
    model["deployment"] = {
        "graceful_shutdown_timeout_s": 10,
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 1,
            "initial_replicas": 1,
            "downscale_delay_s": 8,
            "downscale_to_zero_delay_s": 8,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
    }
    deploy([model])
    replicas = ReplicaTrace("idle").start()
    try:
        first = send_one(url, chat_call("idle", "hi", 5), read_timeout_s=120)
        assert first.status == 200 and first.done
        wait_for(lambda: warm_state("idle")["state"] == "asleep", 15, "the idle sleep")
        asleep_at = time.monotonic()
        wait_for(lambda: replicas.running() == 0 and replicas.samples[-1][2] == 0, 90, "the removal")
        assert time.monotonic() - asleep_at > 3  # removed later than it slept
        again = send_one(url, chat_call("idle", "hi", 5), read_timeout_s=120)  # from zero
        assert again.status == 200 and again.done
    finally:
        replicas.stop()
