"""The per-model Ray Serve deployment: each replica wraps one engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from serve_app.config import ModelConfig, RequestLimits
from serve_app.engine import engine_for
from serve_app.engine.protocol import Engine, EngineStats, Head, ModelInfo, Route, Usage
from serve_app.errors import error_body
from serve_app.guards.adapters import AdapterError
from serve_app.serving.adapters import AdapterSpec, ReplicaAdapters
from serve_app.serving.autoscaling import KV_CACHE, POLICY_IMPORT_PATH, RUNNING, WAITING
from serve_app.serving.cpu_priority import CpuPriority
from serve_app.serving.gpu_lease import HolderInfo, ServeLease, gpu_key
from serve_app.serving.lanes import Lane
from serve_app.serving.ray_compat import report_multiplexed_ids
from serve_app.serving.reaper import start_reaper
from serve_app.serving.routing import Affinity, router_config
from serve_app.serving.streams import coalesce
from serve_app.serving.telemetry import GAUGE_PERIOD_S, AdapterMetrics, EngineGauges, WarmTierMetrics
from serve_app.serving.warm import WarmTier

logger = logging.getLogger("ray.serve")


def _replica_id() -> str:
    """This Serve replica's id (the label of its gauges); "local" outside Serve (tests)."""
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # RayServeException: not in a replica
        return "local"


@contextlib.contextmanager
def _keep_log_handlers() -> Iterator[None]:
    """Keep Ray Serve's replica log file working through an engine's start.

    vLLM applies its logging config with `logging.config.dictConfig`, which closes every
    handler of the process. Serve writes its replica log file through a `MemoryHandler`,
    which drops its target when closed: from then on, the replica's log lines (request ids
    included) would reach only stderr. Restore the targets.
    """
    handlers = {h for name in ("", "ray", "ray.serve") for h in logging.getLogger(name).handlers}
    buffered = [(h, h.target) for h in handlers if isinstance(h, logging.handlers.MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in buffered:
            if handler.target is None and target is not None:
                handler.setTarget(target)


# Each of our replicas runs its code on the event loop where Serve sends and receives its
# messages, not on a second loop in another thread (Serve's default): every chunk then skips a
# cross-thread hand-off, and the replica's stream is pulled only as fast as Serve sends it, so
# chunks that queue meanwhile are coalesced. Measured with the HAProxy front on 2 cores at 64
# streams: 169 against 209 us of model-replica CPU per output token (docs/benchmarks.md).
# A model's own `env` can set it back to "1".
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def _nothing() -> None:
    pass


class ModelServer:
    """One replica of one model: starts its engine and serves the OpenAI routes it handles."""

    async def __init__(  # type: ignore[misc]
        self,
        config: ModelConfig,
        engine_cls: type[Engine] | None = None,
        limits: RequestLimits | None = None,
        leases: Any = None,
        idle_cpu_priority: bool = False,
    ) -> None:
        """`leases`: a handle to the application's GpuLeases deployment, for a model in a
        `warm_tier.gpu_group`; `idle_cpu_priority`: the engine's processes run at idle CPU
        priority while no interactive request is in flight (serve_app.serving.cpu_priority)."""
        self._config = config
        # Engine processes must not outlive this replica, even if it is killed.
        self._reaper = start_reaper()
        self._engine = (engine_cls or engine_for(config))(config)
        if limits is not None:
            self._engine.limits = limits
        self._warm = self._warm_tier(leases)
        if self._warm is not None:
            await self._warm.before_start()
        logger.info("model %s: starting engine", config.id)
        with _keep_log_handlers():
            await self._engine.start()
        logger.info("model %s: engine ready", config.id)
        if self._warm is not None:
            self._warm.run()
        lora = config.lora_options is not None
        metrics = AdapterMetrics(config.id, _replica_id()) if lora else None
        self._adapters = (
            ReplicaAdapters(config, self._engine, metrics, report_multiplexed_ids) if lora else None
        )
        self._lane = Lane()  # interactive requests first (serve_app.serving.lanes)
        self._cpu = CpuPriority(config.id, self._engine.core_pids, idle_cpu_priority)
        self._gauges_task = asyncio.create_task(self._report_load())

    def _warm_tier(self, leases: Any) -> WarmTier | None:
        options = self._config.warm_tier
        if options is None:
            return None
        replica = _replica_id()
        lease = None
        if options.gpu_group is not None and leases is not None:
            holder = HolderInfo(replica, self._config.id, self._config.gpu_memory_share)
            lease = ServeLease(leases, gpu_key(), holder)
        return WarmTier(
            self._config.id, self._engine, options, lease, WarmTierMetrics(self._config.id, replica)
        )

    async def _report_load(self) -> None:
        """Publish the engine's load as Ray gauges every `GAUGE_PERIOD_S`."""
        gauges = EngineGauges(self._config.id, _replica_id())
        while True:
            try:
                gauges.update(self._engine.stats())
                if self._warm is not None:
                    self._warm.report()
            except Exception as exc:  # never let metrics stop a replica
                logger.warning("model %s: cannot read engine stats: %r", self._config.id, exc)
            await asyncio.sleep(GAUGE_PERIOD_S)

    async def generate(
        self,
        route: Route,
        body: bytes,
        request_id: str,
        affinity: Affinity | None = None,
        adapter: AdapterSpec | None = None,
        batch: bool = False,
    ) -> AsyncIterator[Head | bytes | Usage | None]:
        """Stream one request's response: `None` as soon as this replica has taken the request
        (the ingress bounds only the wait for that), then a `Head`, then SSE bytes if it streams.
        `affinity` is what routed the request here (serve_app.serving.routing), for the
        router only. `adapter`: the LoRA adapter the body names, loaded here first if it is not
        (a 4xx answer if it cannot load). `batch`: a request of a batch, which enters the engine
        only while no interactive request here waits for its first token (serve_app.serving.lanes).

        A replica whose engine is already dead does not take the request: it ends, and the
        ingress tries another replica (it retries only requests that no replica took). One
        whose engine sleeps (warm tier) wakes it first, or fails the request with WakeFailed."""
        if self._engine.dead():
            self._die()
        if self._warm is not None:
            # Before taking the request: the ingress holds it meanwhile, as at zero replicas.
            await self._warm.enter()
        try:
            yield None
            async with contextlib.AsyncExitStack() as held:
                if not batch:  # its engine at normal CPU priority to its end, its adapter's load included
                    held.callback(self._cpu.begin())
                if adapter is not None:
                    refusal = await self._hold_adapter(held, adapter)
                    if refusal is not None:
                        yield refusal
                        return
                if batch:
                    await self._lane.quiet()
                    started = _nothing
                else:
                    started = self._lane.hold().release
                    held.callback(started)
                # Chunks that queue while Serve sends earlier ones travel on as one message.
                interval_s = self._config.stream_batching_interval_ms / 1000
                stream = coalesce(self._engine.handle(route, body, request_id), interval_s)
                async with contextlib.aclosing(stream) as items:
                    async for item in items:
                        if isinstance(item, Head) and item.status >= 500 and self._engine.dead():
                            self._die()  # the request fails (it may be what killed the engine)
                        if not (isinstance(item, Head) and item.stream):  # its first token, or all of it
                            started()
                        yield item
        except Exception:
            if self._engine.dead():
                self._die()
            raise
        finally:
            if self._warm is not None:
                self._warm.leave()

    async def _hold_adapter(self, stack: contextlib.AsyncExitStack, adapter: AdapterSpec) -> Head | None:
        """Hold `adapter` loaded here until `stack` closes (loading it if it is not); the error
        answer if it cannot be."""
        if self._adapters is None:
            return Head(404, error_body(404, f"The model `{adapter.name}` does not exist.", param="model"))
        try:
            await stack.enter_async_context(self._adapters.use(adapter))
        except AdapterError as exc:
            logger.warning("model %s: adapter %s cannot load: %s", self._config.id, adapter.name, exc)
            return Head(exc.status, error_body(exc.status, f"adapter '{adapter.name}': {exc}", param="model"))
        return None

    async def check_adapter(self, adapter: AdapterSpec) -> tuple[int, str] | None:
        """Whether `adapter` could load here: None, or the (4xx status, reason) it could not."""
        if self._adapters is None:
            return 400, f"model '{self._config.id}' serves no LoRA adapters (no `lora` in its config)"
        try:
            await self._adapters.check(adapter)
        except AdapterError as exc:
            return exc.status, exc.message
        return None

    async def adapters(self) -> dict[str, Any]:
        """This replica's id, the adapters loaded here (their multiplexed ids, least recently
        used first), and its adapter requests by outcome (held, loaded, failed)."""
        held = self._adapters.held() if self._adapters is not None else []
        counts = dict(self._adapters.counts) if self._adapters is not None else {}
        return {"replica": _replica_id(), "held": held, "requests": counts}

    def _die(self) -> None:
        """The engine is gone for good: end this replica's process at once.

        Every request on it then fails with the actor's death, which makes Serve's routers
        drop the replica before the ingress retries those requests, and Serve starts a new
        replica (its health check would notice only at the next period). The reaper kills
        whatever engine process is left.
        """
        logger.error(
            "model %s: the engine died; ending this replica so that Serve replaces it", self._config.id
        )
        for handler in logging.getLogger("ray.serve").handlers:
            handler.flush()
        os._exit(1)

    async def model_info(self) -> ModelInfo:
        return self._engine.info()

    async def engine_stats(self) -> EngineStats:
        return await self._engine.current_stats()

    async def warm_tier_state(self) -> dict[str, Any] | None:
        """Whether the engine is awake or asleep, and its wakes and sleeps so far (None: the
        model has no warm tier)."""
        if self._warm is None:
            return None
        return {"state": self._warm.state.value, "wakes": self._warm.wakes, "sleeps": dict(self._warm.sleeps)}

    async def check_health(self) -> None:
        if self._warm is not None and self._warm.fatal:
            raise RuntimeError(self._warm.fatal)  # Serve replaces the replica
        # At normal CPU priority: an idle engine's probe must not wait behind a busy machine.
        end = self._cpu.begin()
        try:
            await self._engine.check_health()
        finally:
            end()

    async def __del__(self) -> None:
        if (task := getattr(self, "_gauges_task", None)) is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._engine.shutdown()
        # Only now is the engine's memory free: give its share of the GPU back.
        if (warm := getattr(self, "_warm", None)) is not None:
            await warm.close()
        if (reaper := getattr(self, "_reaper", None)) is not None:
            reaper.terminate()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What the engine reports to the autoscaling policy (serve_app.serving.autoscaling)."""
        stats = self._engine.stats()
        return {
            RUNNING: float(stats.running),
            WAITING: float(stats.waiting),
            KV_CACHE: float(stats.kv_cache_usage),
        }

    @classmethod
    def get_deployment_options(cls, config: ModelConfig) -> dict[str, Any]:
        """The Ray Serve options of this model's deployment, derived from its config."""
        dep = config.deployment
        gpus = config.gpus_per_replica
        env = {**REPLICA_ENV, **config.env}
        options: dict[str, Any] = {
            "name": config.deployment_name,
            "max_ongoing_requests": config.max_ongoing_requests,
            "max_queued_requests": dep.max_queued_requests,
            "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
            "health_check_period_s": dep.health_check_period_s,
            "health_check_timeout_s": dep.health_check_timeout_s,
            "ray_actor_options": {
                "num_cpus": config.num_cpus,
                "num_gpus": gpus,
                "runtime_env": {"env_vars": env},
            },
        }
        if (router := router_config(config.routing, config.lora_options is not None)) is not None:
            options["request_router_config"] = router
        if gpus > 0:
            # One bundle holding all of a replica's GPUs (tensor x pipeline parallel), so Ray
            # places each replica whole on one node and spreads replicas over GPU nodes; a
            # pending bundle is what makes the Ray autoscaler add a GPU node.
            options["placement_group_bundles"] = [{"CPU": config.num_cpus, "GPU": gpus}]
            options["placement_group_strategy"] = "STRICT_PACK"
        auto = dep.autoscaling
        if dep.num_replicas is not None or auto is None:
            options["num_replicas"] = dep.num_replicas or 1
            return options
        options["autoscaling_config"] = {
            "min_replicas": auto.min_replicas,
            "max_replicas": auto.max_replicas,
            "initial_replicas": auto.initial_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": auto.upscale_delay_s,
            "downscale_delay_s": auto.downscale_delay_s,
            "downscale_to_zero_delay_s": auto.downscale_to_zero_delay_s,
            "look_back_period_s": auto.look_back_period_s,
            # Deprecated in Ray 2.60 in favour of process-wide environment variables, but
            # still honoured, and the only per-deployment way to report load every second.
            "metrics_interval_s": auto.metrics_interval_s,
            "policy": {
                "policy_function": POLICY_IMPORT_PATH,
                "policy_kwargs": {
                    "downscale_utilization": auto.downscale_utilization,
                    "kv_cache_high": auto.kv_cache_high,
                },
            },
        }
        return options
