"""Build the Serve application from its config: the `import_path` of `serve deploy`.

Building validates the config (vLLM's own checks on the engine arguments included) and
binds deployments; it starts nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.config import AppConfig, ConfigError, ModelConfig, load_app_config
from serve_app.engine import engine_class, engine_for
from serve_app.engine.protocol import Engine
from serve_app.guards.adapters import AdapterError, resolve_source
from serve_app.models.mistral_layout import infer_args
from serve_app.serving.adapter_registry import REGISTRY_NAME, AdapterRegistry
from serve_app.serving.adapters import AdapterSpec
from serve_app.serving.batches.service import SERVICE_NAME, BatchService
from serve_app.serving.catalog import ModelCard
from serve_app.serving.gpu_lease import LEASES_NAME, GpuLeases
from serve_app.serving.ingress import make_ingress
from serve_app.serving.server import REPLICA_ENV, ModelServer

# The ingress's router (which picks a model replica for each request) runs on the replica's one
# event loop too, not on a loop of its own (Serve's default), which hands every chunk the
# ingress relays across threads once more: on one H200 at 64 and 256 streams, 0.46 against 0.75
# and 0.32 against 0.44 ingress cores at the same tokens/s (docs/benchmarks.md).
INGRESS_ENV = {**REPLICA_ENV, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}

INGRESS_NAME = "OpenAIIngress"


def _owned_by(model_id: str) -> str:
    return model_id.split("/", 1)[0] if "/" in model_id else "mistral-serve"


def resolve_model(model: ModelConfig) -> ModelConfig:
    """The model with Mistral's native-layout settings filled in where its source has that layout."""
    if model.engine != "vllm":
        return model
    engine_args, server_args, _ = infer_args(model.source, model.engine_args, model.server_args)
    if (engine_args, server_args) == (model.engine_args, model.server_args):
        return model
    return model.model_copy(update={"engine_args": engine_args, "server_args": server_args})


def model_card(model: ModelConfig) -> ModelCard:
    """What the ingress needs to know of a model to route to it and list it."""
    max_len = model.engine_args.get("max_model_len")
    return ModelCard(
        id=model.id,
        aliases=model.aliases,
        deployment=model.deployment_name,
        owned_by=model.owned_by or _owned_by(model.id),
        max_model_len=int(max_len) if isinstance(max_len, int) else None,
        wait_timeout_s=model.deployment.request_wait_timeout_s,
        priority_scheduling=model.engine_args.get("scheduling_policy") == "priority",
        routing=model.routing,
        lora=model.lora_options is not None,
        adapters=tuple(AdapterSpec(a.name, model.id, a.source, aliases=a.aliases) for a in model.adapters),
    )


def check_warm_tier(model: ModelConfig, engine_cls: type[Engine]) -> None:
    """A model with a warm tier must be able to sleep where it runs."""
    if model.warm_tier is not None and (why := engine_cls.sleep_unsupported(model)) is not None:
        raise ConfigError(f"model '{model.id}': warm_tier: {why}")


def check_adapter_sources(model: ModelConfig) -> None:
    """The config's local adapter sources lie in the model's `lora.source_dirs` (where it sets
    them); a replica checks the files themselves when it loads one."""
    lora = model.lora_options
    for adapter in model.adapters:
        assert lora is not None
        try:
            resolve_source(adapter.source, lora.source_dirs, from_config=True)
        except AdapterError as exc:
            raise ConfigError(f"model '{model.id}': adapter '{adapter.name}': {exc}") from None


def _leases(config: AppConfig) -> Application | None:
    """The GPU lease keeper, where some model shares its GPUs (`warm_tier.gpu_group`)."""
    if not any(m.warm_tier is not None and m.warm_tier.gpu_group for m in config.models):
        return None
    # One replica keeps every GPU's book; its calls are waits (long polls), not work.
    return (
        serve.deployment(GpuLeases)
        .options(
            name=LEASES_NAME, num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
        )
        .bind()
    )


def _adapter_registry(config: AppConfig) -> Application | None:
    """The book of adapters added at run time, where the admin routes are on and some model
    serves adapters."""
    if config.auth.admin is None or not any(m.lora_options is not None for m in config.models):
        return None
    return (
        serve.deployment(AdapterRegistry)
        .options(
            name=REGISTRY_NAME, num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}
        )
        .bind()
    )


def model_ids(config: AppConfig) -> dict[str, str]:
    """The model id of every name a request may use: ids, aliases, the config's adapters."""
    return {name: m.id for m in config.models for name in (*m.names, *m.adapter_names)}


def _batch_service(config: AppConfig) -> Application | None:
    """The batch service (the Batch API's files and batches), unless `batches.enabled` is off."""
    options = config.batches
    if not options.enabled:
        return None
    actor: dict[str, Any] = {"num_cpus": 0}
    if "://" not in options.store:
        # A local directory: on the head node, where it is found again after any restart.
        actor["resources"] = {"node:__internal_head__": 0.001}
    return (
        serve.deployment(BatchService)
        .options(name=SERVICE_NAME, num_replicas=1, max_ongoing_requests=10_000, ray_actor_options=actor)
        .bind(options, config.limits, model_ids(config), INGRESS_NAME, metrics=True)
    )


def build_openai_app(
    config: AppConfig, *, engine_cls: type[Engine] | None = None, validate_engine: bool = True
) -> Application:
    """Bind one deployment per model and the OpenAI ingress in front of them."""
    config = config.model_copy(update={"models": tuple(resolve_model(m) for m in config.models)})
    if validate_engine and engine_cls is None:
        for model in config.models:
            engine_class(model.engine).validate(model)
    for model in config.models:
        check_warm_tier(model, engine_cls or engine_for(model))
        check_adapter_sources(model)
    leases = _leases(config)
    handles = {
        model.deployment_name: serve.deployment(ModelServer)
        .options(**ModelServer.get_deployment_options(model))
        .bind(
            model,
            engine_cls,
            config.limits,
            leases if model.warm_tier and model.warm_tier.gpu_group else None,
            idle_cpu_priority=config.batches.enabled and config.batches.idle_cpu_priority,
        )
        for model in config.models
    }
    ingress = config.ingress
    return (
        serve.deployment(make_ingress(cors_allow_origins=config.auth.cors_allow_origins))
        .options(
            name=INGRESS_NAME,
            num_replicas=ingress.num_replicas,
            max_ongoing_requests=ingress.max_ongoing_requests,
            ray_actor_options={"num_cpus": ingress.num_cpus, "runtime_env": {"env_vars": dict(INGRESS_ENV)}},
        )
        # Each ingress replica enforces its share of every quota.
        .bind(
            handles,
            [model_card(model) for model in config.models],
            config.auth,
            config.observability,
            config.quotas.share(ingress.num_replicas),
            config.limits,
            _adapter_registry(config),
            _batch_service(config),
            config.batches,
        )
    )


def build_app(args: dict[str, Any]) -> Application:
    """Entry point for `serve deploy` / `serve run`: the application's `args` are an AppConfig.

    An optional `config_dir` arg says where relative model file paths start (default: the
    working directory).
    """
    args = dict(args)
    base = args.pop("config_dir", None)
    config = load_app_config(args, base_dir=Path(base) if base else None)
    return build_openai_app(config)
