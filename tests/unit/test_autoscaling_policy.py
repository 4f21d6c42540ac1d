"""The LLM-aware policy, alone and under Ray Serve's own wrapper (bounds and delays)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve_app.serving.autoscaling import KV_CACHE, RUNNING, WAITING, LLMAutoscalingPolicy, desired_replicas

TARGET = 48.0


def _want(current: int, router: float = 0, running: float = 0, waiting: float = 0, kv: float = 0) -> int:
    return desired_replicas(
        current=current,
        router_requests=router,
        engine_running=running,
        engine_waiting=waiting,
        kv_cache_usage=kv,
        target=TARGET,
        downscale_utilization=0.6,
        kv_cache_high=0.9,
    )


def test_scales_on_the_larger_of_router_and_engine_load() -> None:
    assert _want(1, router=48) == 1
    assert _want(1, router=100) == 3
    assert _want(1, router=10, running=64, waiting=60) == 3  # the engines know better
    assert _want(0, router=5) == 1


def test_kv_cache_pressure_adds_a_replica() -> None:
    assert _want(2, router=40, running=30, waiting=10, kv=0.95) == 3
    assert _want(2, router=40, running=30, waiting=10, kv=0.5) == 2  # waiting, but memory is fine
    assert _want(2, router=40, running=40, waiting=0, kv=0.99) == 2  # full, but nobody waits


def test_hysteresis_before_scaling_down() -> None:
    # 3 replicas, load falls to what 2 replicas could carry at 100%: not yet.
    assert _want(3, router=96) == 3
    # ... at most 60% of target on each of 2: now.
    assert _want(3, router=0.6 * TARGET * 2) == 2
    assert _want(3, router=0) == 0


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0


def _ctx(
    cfg: AutoscalingConfig, current: int, target: int, router: float, state: dict[str, Any], now: float
) -> Any:
    replicas = [f"r{i}" for i in range(current)]
    per = router / current if current else 0.0
    metrics = {
        RUNNING: dict.fromkeys(replicas, per),
        WAITING: dict.fromkeys(replicas, 0.0),
        KV_CACHE: dict.fromkeys(replicas, 0.1),
    }
    return AutoscalingContext(
        deployment_id=DeploymentID(name="m", app_name="a"),
        deployment_name="m",
        app_name="a",
        current_num_replicas=current,
        target_num_replicas=target,
        running_replicas=replicas,  # type: ignore[arg-type]
        total_num_requests=router,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,  # type: ignore[arg-type]
        raw_metrics={},
        capacity_adjusted_min_replicas=cfg.min_replicas,
        capacity_adjusted_max_replicas=cfg.max_replicas,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=cfg,
    )


def _simulate(load: list[float], tick_s: float = 1.0, upscale_delay_s: float = 3.0) -> list[int]:
    """Replica targets over a load trace, one decision per tick, as Serve's controller runs it."""
    import ray.serve.autoscaling_policy as policy_module

    cfg = AutoscalingConfig(
        min_replicas=1,
        max_replicas=8,
        target_ongoing_requests=TARGET,
        upscale_delay_s=upscale_delay_s,
        downscale_delay_s=20.0,
    )
    policy = _apply_autoscaling_config(LLMAutoscalingPolicy())
    replicas, state, out = 1, {}, []
    clock = 1000.0
    original = policy_module.time.time
    policy_module.time.time = lambda: clock  # type: ignore[assignment]
    try:
        for router in load:
            decision, state = policy(_ctx(cfg, replicas, replicas, router, state, clock))
            replicas = max(cfg.min_replicas, min(cfg.max_replicas, decision))
            out.append(replicas)
            clock += tick_s
    finally:
        policy_module.time.time = original  # type: ignore[assignment]
    return out


def test_load_step_scales_up_within_the_upscale_delay() -> None:
    trace = _simulate([10.0] * 5 + [200.0] * 10)
    first_up = next(i for i, r in enumerate(trace) if r > 1)
    assert trace[first_up] == 5  # ceil(200 / 48): straight to what the load needs
    assert first_up - 5 <= 4  # decided within the 3 s delay (+1 tick), well under 10 s


@pytest.mark.parametrize("period", [8, 20, 30])
def test_sawtooth_load_does_not_flap(period: int) -> None:
    # Load alternating between 60 requests (2 replicas' worth) and 150 (4 replicas' worth).
    trace = [150.0 if (i % period) < period // 2 else 60.0 for i in range(180)]
    decisions = _simulate(trace)
    assert max(decisions) == 4  # it does follow the peaks up...
    changes = sum(1 for a, b in itertools.pairwise(decisions) if a != b)
    assert changes == 1, decisions  # ...and never back down between them


def test_idle_model_scales_down_after_the_delay() -> None:
    trace = _simulate([200.0] * 10 + [0.0] * 40)
    assert max(trace) == 5
    assert trace[-1] == 1  # min_replicas
    down = next(i for i, r in enumerate(trace) if i > 10 and r < 5)
    assert down - 10 >= 19  # not before downscale_delay_s
