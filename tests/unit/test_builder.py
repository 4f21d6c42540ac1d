"""Building the application binds deployments with options derived from the config; it starts nothing."""

from __future__ import annotations

import ray
from ray.serve import Application

from serve_app.config import load_app_config, load_serve_file
from serve_app.serving.builder import INGRESS_NAME, build_app, build_openai_app
from serve_app.serving.server import ModelServer
from tests.conftest import ROOT


def _deployments(app: Application) -> dict[str, object]:
    ingress = app._bound_deployment
    found = {ingress.name: ingress}
    handles = ingress.init_args[0]
    for name, bound in handles.items():
        found[name] = bound._bound_deployment
    return found


def test_builds_local_config_without_starting_ray() -> None:
    args = load_serve_file(ROOT / "configs/local.yaml").args
    app = build_app(args)
    assert isinstance(app, Application)
    assert set(_deployments(app)) == {INGRESS_NAME, "tiny-mistral-v3", "tiny-mistral-tekken"}
    assert not ray.is_initialized()


def test_production_config_builds_with_gpu_options() -> None:
    config = load_app_config(load_serve_file(ROOT / "configs/production.yaml").args)
    app = build_openai_app(config)
    deployments = _deployments(app)
    small = deployments["mistralai--Mistral-Small-Instruct-2409"]
    assert small.ray_actor_options["num_gpus"] == 2  # type: ignore[attr-defined]
    pixtral = deployments["mistralai--Pixtral-12B-2409"]
    auto = pixtral._deployment_config.autoscaling_config  # type: ignore[attr-defined]
    assert auto.min_replicas == 0 and auto.max_replicas == 2
    assert not ray.is_initialized()


def test_deployment_options_follow_the_config() -> None:
    config = load_app_config(
        {
            "models": [
                {
                    "id": "org/model",
                    "source": "org/model",
                    "num_gpus": 0,
                    "env": {"A": "1"},
                    "deployment": {"max_ongoing_requests": 10, "autoscaling": {"max_replicas": 3}},
                },
                {
                    "id": "org/other",
                    "source": "org/other",
                    "num_gpus": 0,
                    "env": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"},
                },
            ]
        }
    )
    options = ModelServer.get_deployment_options(config.models[0])
    assert options["name"] == "org--model"
    assert options["ray_actor_options"]["num_gpus"] == 0
    # The model's env, plus user code on Serve's own event loop (serve_app.serving.server.REPLICA_ENV).
    assert options["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"A": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    }
    other = ModelServer.get_deployment_options(config.models[1])["ray_actor_options"]["runtime_env"]
    assert other == {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}}  # a model's own wins
    assert options["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in options
    assert options["max_ongoing_requests"] == 10
    policy = options["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "serve_app.serving.autoscaling:LLMAutoscalingPolicy"
    assert "placement_group_bundles" not in options  # a CPU model needs no GPU bundle


def test_llm_sized_defaults_follow_max_num_seqs() -> None:
    config = load_app_config(
        {
            "models": [
                {
                    "id": "m",
                    "source": "org/m",
                    "engine_args": {"max_num_seqs": 64, "max_model_len": 8192, "tensor_parallel_size": 2},
                    "deployment": {"autoscaling": {"min_replicas": 0, "max_replicas": 4}},
                }
            ]
        }
    )
    options = ModelServer.get_deployment_options(config.models[0])
    assert options["max_ongoing_requests"] == 64
    assert options["autoscaling_config"]["target_ongoing_requests"] == 48
    assert options["graceful_shutdown_timeout_s"] == 8192 / 20
    # A TP=2 replica asks for both GPUs in one bundle, packed on one node.
    assert options["ray_actor_options"]["num_gpus"] == 2
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 2.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # Ray Serve accepts the whole autoscaling config, the custom policy included.
    from ray.serve.config import AutoscalingConfig

    auto = AutoscalingConfig(**options["autoscaling_config"])
    assert auto.min_replicas == 0 and auto.policy.policy_function.endswith("LLMAutoscalingPolicy")


def test_minimal_entry_for_a_mistral_layout_gets_mistral_settings() -> None:
    from serve_app.serving.builder import resolve_model

    config = load_app_config({"models": [{"id": "demo", "source": str(ROOT / "models/tiny-mistral-tekken")}]})
    model = resolve_model(config.models[0])
    assert model.engine_args == {
        "tokenizer_mode": "mistral",
        "config_format": "mistral",
        "load_format": "mistral",
    }
    assert model.server_args == {"tool_call_parser": "mistral", "enable_auto_tool_choice": True}
    # The built application carries the resolved entry to its replicas.
    deployments = _deployments(build_openai_app(config))
    bound = deployments["demo"]
    assert bound.init_args[0].engine_args["tokenizer_mode"] == "mistral"  # type: ignore[attr-defined]


def test_each_ingress_replica_is_given_its_share_of_the_quotas() -> None:
    config = load_app_config(
        {
            "models": [{"id": "m", "source": "none", "engine": "fake", "num_gpus": 0}],
            "ingress": {"num_replicas": 2},
            "quotas": {"default": {"requests_per_minute": 600, "concurrent_requests": 5}},
        }
    )
    ingress = build_openai_app(config)._bound_deployment
    handles, cards, _auth, _observability, quotas, _limits, _registry, batches, options = ingress.init_args
    assert quotas == config.quotas.share(2)
    # The batch service, on the head node where its store is a local directory.
    service = batches._bound_deployment
    assert service.name == "BatchService" and service.num_replicas == 1 and options == config.batches
    assert service.ray_actor_options["resources"] == {"node:__internal_head__": 0.001}
    assert quotas.default.requests_per_minute == 300 and quotas.default.concurrent_requests == 3
    assert [card.id for card in cards] == ["m"] and set(handles) == {"m"}


def test_the_ingress_routes_and_runs_its_code_on_one_event_loop() -> None:
    config = load_app_config({"models": [{"id": "m", "source": "none", "engine": "fake", "num_gpus": 0}]})
    ingress = build_openai_app(config)._bound_deployment
    env = ingress.ray_actor_options["runtime_env"]["env_vars"]
    assert env == {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    }


def test_model_replicas_run_batch_work_at_idle_cpu_priority_only_where_batches_say_so() -> None:
    """configs/local.yaml (models sharing a CPU) asks for it; the default and a config whose
    Batch API is off do not."""
    args = load_serve_file(ROOT / "configs/local.yaml").args
    for batches, expected in (
        (args["batches"], True),
        ({}, False),
        ({**args["batches"], "enabled": False}, False),
    ):
        app = build_openai_app(load_app_config({**args, "batches": batches}, base_dir=ROOT))
        for name, bound in _deployments(app).items():
            if name != INGRESS_NAME:
                assert bound.init_kwargs["idle_cpu_priority"] is expected, (name, batches)  # type: ignore[attr-defined]
