"""The LLM-aware autoscaling policy, run by Ray Serve's controller for each model.

Ray Serve calls the policy every control-loop tick with an `AutoscalingContext`; it wraps
the policy with the deployment's bounds and its upscale/downscale delays, and starts a
first replica at once when a request arrives for a model at zero replicas.

The policy looks at two views of load, each averaged over `look_back_period_s`:
- the requests Serve's routers count for the deployment (running in replicas plus queued
  at routers, which is what a cold or saturated deployment sees), and
- what the engines report through `ModelServer.record_autoscaling_stats`: requests
  running and waiting in each engine, and KV-cache use.

It asks for enough replicas to bring the larger load to `target` requests per replica, adds
one while engines are out of KV cache and requests wait in them, and scales down only when
the smaller deployment would run at most `downscale_utilization x target` per replica, so a
load that hovers around a threshold does not make it flap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# The keys ModelServer.record_autoscaling_stats reports.
RUNNING = "engine_running"
WAITING = "engine_waiting"
KV_CACHE = "engine_kv_cache_usage"


def _total(metrics: Mapping[str, Mapping[Any, float]], key: str) -> float:
    return float(sum(metrics.get(key, {}).values()))


def desired_replicas(
    *,
    current: int,
    router_requests: float,
    engine_running: float,
    engine_waiting: float,
    kv_cache_usage: float,
    target: float,
    downscale_utilization: float,
    kv_cache_high: float,
) -> int:
    """The replica count for this load (before Serve's bounds and delays)."""
    load = max(router_requests, engine_running + engine_waiting)
    if current == 0:
        return math.ceil(load / target)
    wanted = math.ceil(load / target)
    if engine_waiting > 0 and kv_cache_usage >= kv_cache_high:
        # The engines are out of KV cache and queue requests: more replicas, not more queue.
        wanted = max(wanted, current + 1)
    if wanted >= current:
        return wanted
    # Shrink only to a count that would still run comfortably below target.
    return min(current, math.ceil(load / (target * downscale_utilization)))


class LLMAutoscalingPolicy:
    """Ray Serve custom autoscaling policy (`autoscaling_config.policy.policy_function`)."""

    def __init__(self, downscale_utilization: float = 0.6, kv_cache_high: float = 0.9) -> None:
        self.downscale_utilization = downscale_utilization
        self.kv_cache_high = kv_cache_high

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
        kv = metrics.get(KV_CACHE, {})
        desired = desired_replicas(
            current=ctx.current_num_replicas,
            router_requests=float(ctx.total_num_requests),
            engine_running=_total(metrics, RUNNING),
            engine_waiting=_total(metrics, WAITING),
            kv_cache_usage=max(kv.values(), default=0.0),
            target=float(ctx.config.get_target_ongoing_requests()),
            downscale_utilization=self.downscale_utilization,
            kv_cache_high=self.kv_cache_high,
        )
        return desired, dict(ctx.policy_state)


POLICY_IMPORT_PATH = f"{__name__}:LLMAutoscalingPolicy"
