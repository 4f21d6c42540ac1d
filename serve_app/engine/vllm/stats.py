"""The engine's load as vLLM's scheduler reports it, and vLLM's own metrics exported through Ray."""

from __future__ import annotations

import time
from typing import Any


class SchedulerSnapshot:
    """A vLLM stat logger that keeps the latest scheduler statistics of one engine.

    vLLM calls `record` after every engine step; the engine's `stats()` reads the last values,
    so the replica's load costs one attribute read. It follows vLLM's `StatLoggerBase`
    interface (per-engine factory: `(vllm_config, engine_index) -> logger`).
    """

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache, all steps
        self.prefix_cache_hits = 0  # and found there
        self.last_step = time.monotonic()  # when the engine last reported a step

    def factory(self, vllm_config: Any, engine_index: int = 0) -> SchedulerSnapshot:
        return self

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        self.last_step = time.monotonic()
        if scheduler_stats is not None:
            self.running = int(scheduler_stats.num_running_reqs)
            self.waiting = int(scheduler_stats.num_waiting_reqs) + int(
                getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            )
            self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
            # Each step's counts: the engine core sends them to one client (frontend) only.
            if (prefix := getattr(scheduler_stats, "prefix_cache_stats", None)) is not None:
                self.prefix_cache_queries += int(prefix.queries)
                self.prefix_cache_hits += int(prefix.hits)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass


def ray_stat_logger() -> Any | None:
    """vLLM's stat logger that exports its metrics through Ray (to Ray's Prometheus endpoint),
    when the engine runs under Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError:
        return None
    return RayPrometheusStatLogger
