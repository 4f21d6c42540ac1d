"""The per-model Ray Serve deployment: each replica wraps one engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from serve_app.config import ModelConfig
from serve_app.engine.protocol import Engine, EngineStats, Head, ModelInfo, Route

logger = logging.getLogger("ray.serve")


def _default_engine_cls() -> type[Engine]:
    # Imported here so that building the application does not import vLLM.
    from serve_app.engine.vllm_engine import VLLMEngine

    return VLLMEngine


class ModelServer:
    """One replica of one model: starts its engine and serves the OpenAI routes it handles."""

    async def __init__(self, config: ModelConfig, engine_cls: type[Engine] | None = None) -> None:  # type: ignore[misc]
        self._config = config
        self._engine = (engine_cls or _default_engine_cls())(config)
        logger.info("model %s: starting engine", config.id)
        await self._engine.start()
        logger.info("model %s: engine ready", config.id)

    async def generate(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes]:
        """Stream one request's response: a `Head`, then SSE bytes if it streams."""
        async for item in self._engine.handle(route, body, request_id):
            yield item

    async def model_info(self) -> ModelInfo:
        return self._engine.info()

    async def engine_stats(self) -> EngineStats:
        return self._engine.stats()

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def __del__(self) -> None:
        await self._engine.shutdown()

    @classmethod
    def get_deployment_options(cls, config: ModelConfig) -> dict[str, Any]:
        """The Ray Serve options of this model's deployment, derived from its config."""
        dep = config.deployment
        options: dict[str, Any] = {
            "name": config.deployment_name,
            "max_ongoing_requests": dep.max_ongoing_requests,
            "max_queued_requests": dep.max_queued_requests,
            "graceful_shutdown_timeout_s": dep.graceful_shutdown_timeout_s,
            "health_check_period_s": dep.health_check_period_s,
            "health_check_timeout_s": dep.health_check_timeout_s,
            "ray_actor_options": {
                "num_cpus": config.num_cpus,
                "num_gpus": config.gpus_per_replica,
                "runtime_env": {"env_vars": dict(config.env)} if config.env else {},
            },
        }
        if dep.num_replicas is not None:
            options["num_replicas"] = dep.num_replicas
        else:
            auto = dep.autoscaling
            if auto is None:
                options["num_replicas"] = 1
            else:
                options["autoscaling_config"] = {
                    "min_replicas": auto.min_replicas,
                    "max_replicas": auto.max_replicas,
                    "initial_replicas": auto.initial_replicas,
                    "target_ongoing_requests": auto.target_ongoing_requests
                    or max(1.0, dep.max_ongoing_requests / 2),
                    "upscale_delay_s": auto.upscale_delay_s,
                    "downscale_delay_s": auto.downscale_delay_s,
                    "look_back_period_s": auto.look_back_period_s,
                }
        return options
