"""One served model: its names, weights, engine, resources and Serve deployment options."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from serve_app.config.base import StrictModel

# vLLM's usual max_num_seqs on a GPU; set engine_args.max_num_seqs to size a model exactly.
DEFAULT_MAX_NUM_SEQS = 256
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization


def is_local_source(source: str) -> bool:
    """Whether a `source` names a local directory (/, ./, ../ or ~); anything else is a Hugging
    Face repository id."""
    return source.startswith(("/", "./", "../", "~"))


class AutoscalingOptions(StrictModel):
    """Autoscaling of one model, driven by mistral-serve's LLM-aware policy.

    The policy (serve_app.serving.autoscaling) sizes the deployment by the larger of the requests
    its routers count and the requests its engines hold (running + waiting), adds a replica
    while the engines queue for lack of KV cache, and shrinks only when the remaining
    replicas would run well under target (hysteresis).
    """

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 lets the model scale to zero.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started with the application (default: min_replicas)."
    )
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="Requests per replica the policy aims for (default: 3/4 of the engine's max_num_seqs).",
    )
    upscale_delay_s: float = Field(3.0, ge=0, description="Seconds load must stay high before scaling up.")
    downscale_delay_s: float = Field(
        60.0, ge=0, description="Seconds load must stay low before scaling down."
    )
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Seconds idle before going from 1 replica to 0 (default: downscale_delay_s)."
    )
    look_back_period_s: float = Field(5.0, gt=0, description="Window over which load is averaged.")
    metrics_interval_s: float = Field(
        1.0, gt=0, description="How often routers and replicas report load to the autoscaler."
    )
    downscale_utilization: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Scale down only while the remaining replicas would run at most this share of "
        "target_ongoing_requests (hysteresis against flapping).",
    )
    kv_cache_high: float = Field(
        0.9,
        gt=0,
        le=1,
        description="KV-cache use above which requests waiting in an engine add a replica.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class DeploymentOptions(StrictModel):
    """Ray Serve options of one model's deployment."""

    num_replicas: int | None = Field(
        None, ge=1, description="A fixed replica count; leave unset to autoscale."
    )
    autoscaling: AutoscalingOptions | None = Field(
        None, description="Autoscaling bounds and targets; used when num_replicas is unset."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests one replica handles at once; more wait at the router "
        "(default: the engine's max_num_seqs).",
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests that may wait at each router for a replica (-1: no limit)."
    )
    graceful_shutdown_timeout_s: float | None = Field(
        None,
        ge=0,
        description="Seconds a stopping replica gets to finish its in-flight requests (default: the "
        "longest generation, max_model_len tokens at 20 tokens/s, between 60 s and 1 h).",
    )
    request_wait_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds a request may wait at the ingress for a replica to accept it (e.g. while "
        "the model scales up from zero); past it the client gets 503 with Retry-After.",
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="Seconds a health check may take.")

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self


_DEPLOYMENT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class MediaOptions(StrictModel):
    """Image input of a model that takes images (e.g. Pixtral)."""

    allowed_remote_hosts: tuple[str, ...] = Field(
        (),
        description="Hosts whose http(s) image URLs the server may fetch (exact names). "
        "Empty (the default): only inline data: URLs, so clients cannot make the server fetch "
        "arbitrary URLs (server-side request forgery).",
    )


class WarmTierOptions(StrictModel):
    """Sleep instead of removal: an idle replica parks its engine (vLLM's sleep mode, level 1:
    weights to host memory, KV cache dropped) and wakes it for the next request in seconds,
    where a cold start takes minutes. Replicas of models in one `gpu_group` may share a GPU:
    at most as many are awake on it as their `gpu_memory_share`s fit, and waking one first puts
    the least recently used to sleep (serve_app.serving.gpu_lease)."""

    sleep_after_idle_s: float = Field(
        gt=0,
        description="Seconds a replica has had no request before its engine sleeps. It is removed "
        "only later, as without the tier (autoscaling's downscale_to_zero_delay_s, with min_replicas 0).",
    )
    gpu_group: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Models with a group may share GPUs: set num_gpus below 1 (e.g. 0.5) so that Ray "
        "places several replicas on one GPU; a lease per GPU keeps at most as many awake there as their "
        "gpu_memory_shares fit (leave room for what each asleep engine keeps: a few GiB).",
    )
    gpu_memory_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of its GPU's memory the model uses awake (vLLM's gpu_memory_utilization, "
        "which it sets; default: engine_args.gpu_memory_utilization, else vLLM's 0.9).",
    )
    wake_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds a wake may take to find room on the GPU, and then for the engine to wake; "
        "past either, the requests that waited get 503 with Retry-After (an engine that did not wake "
        "is replaced with its replica).",
    )


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank
# What an adapter's name may be: it is a `model` clients send, a metrics label and a log field.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class AdapterConfig(StrictModel):
    """One LoRA adapter of a model, served under its own name (clients send it as `model`)."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="The name clients send as `model`.")
    aliases: tuple[str, ...] = Field((), description="Other names clients may send for this adapter.")
    source: str = Field(
        min_length=1,
        description="A local directory (starting with /, ./, ../ or ~) or a Hugging Face repository id "
        "holding the adapter in PEFT's format (adapter_config.json and adapter_model.safetensors). "
        "vLLM does not read Mistral's own LoRA format (mistral-finetune's lora.safetensors).",
    )

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            if not re.fullmatch(ADAPTER_NAME_PATTERN, alias):
                raise ValueError(f"alias {alias[:140]!r} does not match {ADAPTER_NAME_PATTERN}")
        return value


class LoraOptions(StrictModel):
    """LoRA adapters on a model's replicas (vLLM's runtime LoRA loading). An adapter loads into a
    replica on its first request there; past `max_adapters_per_replica` the replica evicts the
    least recently used one, and requests for an adapter go to the replicas that hold it
    (serve_app.serving.adapters)."""

    max_loras: int = Field(
        1, ge=1, le=256, description="Adapters one batch may mix (vLLM's max_loras: GPU slots)."
    )
    max_lora_rank: int = Field(
        16,
        description="Largest rank of an adapter (vLLM's max_lora_rank: 1, 8, 16, 32, 64, 128, 256, 320 or "
        "512); adapters of a larger rank are refused.",
    )
    max_adapters_per_replica: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Adapters one replica holds loaded (in host memory, vLLM's max_cpu_loras); past it "
        "the least recently used is evicted. Default: max_loras.",
    )
    source_dirs: tuple[str, ...] = Field(
        (),
        description="Directories local adapter sources must lie in, the config's and the admin "
        "route's (after resolving links and `..`). Empty: local sources of the config only, none at run time.",
    )
    check_base_name: bool = Field(
        True,
        description="Refuse an adapter whose adapter_config.json names another base model "
        "(base_model_name_or_path, compared by its last path part with the model's id, aliases and source).",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(
                f"vLLM takes a max_lora_rank of {', '.join(map(str, VLLM_LORA_RANKS))}, not {value}"
            )
        return value

    @property
    def adapters_per_replica(self) -> int:
        return self.max_adapters_per_replica or self.max_loras

    @model_validator(mode="after")
    def _holds_a_batch(self) -> LoraOptions:
        if self.adapters_per_replica < self.max_loras:
            raise ValueError(
                f"max_adapters_per_replica ({self.adapters_per_replica}) must be at least max_loras ({self.max_loras})"
            )
        return self


# vLLM's LoRA arguments are set from `lora`; engine_args may not set them too.
LORA_ENGINE_ARGS = ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras")


class ModelConfig(StrictModel):
    """One served model: the names clients send, its weights, and how to run it."""

    id: str = Field(
        min_length=1,
        description="The name clients send as `model`, e.g. mistralai/Mistral-Nemo-Instruct-2407.",
    )
    aliases: tuple[str, ...] = Field((), description="Other names clients may send for this model.")
    owned_by: str | None = Field(
        None, description="`owned_by` in /v1/models (default: the id's organisation, e.g. mistralai)."
    )
    source: str = Field(
        min_length=1,
        description="Hugging Face repository id or local directory holding the weights.",
    )
    engine: Literal["vllm", "fake"] = Field(
        "vllm",
        description="The engine: vllm, or fake (no model: answers at a set speed, for load and "
        "scaling tests; its engine_args are ttft_s, tokens_per_s, max_num_seqs, max_model_len).",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments (fields of vllm.AsyncEngineArgs), e.g. "
        "tokenizer_mode, max_model_len, tensor_parallel_size. For a source in Mistral's native "
        "layout, tokenizer_mode, config_format and load_format default to mistral.",
    )
    server_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM OpenAI-server options that are not engine arguments, e.g. "
        "tool_call_parser, enable_auto_tool_choice, chat_template. For a source in Mistral's "
        "native layout, Mistral tool calling is on by default.",
    )
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs per replica (default: tensor_parallel_size x pipeline_parallel_size; "
        "0 runs on the CPU build of vLLM).",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica.")
    frontends: int | None = Field(
        None,
        ge=1,
        le=32,
        description="vLLM frontend processes per replica, all on the replica's one engine, as "
        "`vllm serve --api-server-count N` runs them: each does its share of the requests' "
        "tokenizing, detokenizing and OpenAI formatting. Default: one per CPU of the replica "
        "beyond the first (`num_cpus` - 1), at least 1. With 1, the replica runs the engine's "
        "frontend itself.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of each replica process."
    )
    media: MediaOptions = Field(default_factory=MediaOptions, description="Image input options.")
    stream_batching_interval_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Send a stream's chunks at most this often from a replica, several per message "
        "(a stream's first two messages are never held). 0: each as soon as the previous is sent, "
        "joining only what queued meanwhile. Fewer, larger messages cost less CPU under load; "
        "clients then get tokens in bursts.",
    )
    deployment: DeploymentOptions = Field(
        default_factory=DeploymentOptions, description="Ray Serve options of this model's deployment."
    )
    routing: Literal["load", "prefix", "session"] = Field(
        "prefix",
        description="Which replica takes a request: `prefix` (the replica whose prefix cache holds "
        "the conversation's beginning, within a load bound), `session` (one replica per "
        "X-Session-Id header or `user` field) or `load` (the less loaded of two). "
        "See serve_app/serving/routing.py.",
    )
    warm_tier: WarmTierOptions | None = Field(
        None,
        description="Sleep instead of removal when idle, and GPU sharing between models (see WarmTierOptions).",
    )
    adapters: tuple[AdapterConfig, ...] = Field(
        (), max_length=1024, description="LoRA adapters served on this model, each under its own name."
    )
    lora: LoraOptions | None = Field(
        None,
        description="LoRA serving: slots, largest rank, adapters per replica, allowed source directories. "
        "Set by default when `adapters` lists any; set it with no adapters to add them only at run time.",
    )

    @model_validator(mode="after")
    def _lora_of_adapters(self) -> ModelConfig:
        if self.lora_options is not None:
            taken = [k for k in LORA_ENGINE_ARGS if k in self.engine_args]
            if taken:
                raise ValueError(
                    f"engine_args.{taken[0]}: set by `lora` (max_loras, max_lora_rank, max_adapters_per_replica)"
                )
        names = list(self.adapter_names)
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"adapters: the name '{name}' is used twice")
            if name in self.names:
                raise ValueError(f"adapters: '{name}' is also the model's own name")
        return self

    @model_validator(mode="after")
    def _frontends_of_vllm(self) -> ModelConfig:
        if self.engine != "vllm" and (self.frontends or 1) > 1:
            raise ValueError(f"frontends: only the vllm engine has frontend processes, not {self.engine}")
        return self

    @model_validator(mode="after")
    def _warm_tier_fits(self) -> ModelConfig:
        warm = self.warm_tier
        if warm is None:
            return self
        utilization = self.engine_args.get("gpu_memory_utilization")
        if (
            warm.gpu_memory_share is not None
            and utilization is not None
            and utilization != warm.gpu_memory_share
        ):
            raise ValueError(
                f"warm_tier.gpu_memory_share ({warm.gpu_memory_share}) and engine_args.gpu_memory_utilization "
                f"({utilization}) disagree: set one"
            )
        if warm.gpu_group is not None and self.gpus_per_replica > 1:
            raise ValueError(
                "warm_tier.gpu_group: models share single GPUs; this one takes "
                f"{self.gpus_per_replica:g} GPUs per replica"
            )
        auto = self.deployment.autoscaling
        if auto is not None and auto.min_replicas == 0:
            to_zero = auto.downscale_to_zero_delay_s
            to_zero = auto.downscale_delay_s if to_zero is None else to_zero
            if warm.sleep_after_idle_s >= to_zero:
                raise ValueError(
                    f"warm_tier.sleep_after_idle_s ({warm.sleep_after_idle_s:g}) must be shorter than the "
                    f"idle time after which the replica is removed (downscale_to_zero_delay_s: {to_zero:g})"
                )
        return self

    @field_validator("engine_args", "server_args")
    @classmethod
    def _no_model_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("model", "served_model_name"):
            if key in value:
                raise ValueError(f"'{key}' is set by the model's `source` and `id`, not here")
        return value

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that routes to this model, its id first."""
        return (self.id, *self.aliases)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Every name that routes to one of the model's adapters (names and aliases)."""
        return tuple(n for a in self.adapters for n in (a.name, *a.aliases))

    @property
    def lora_options(self) -> LoraOptions | None:
        """The model's LoRA options: `lora`, or its defaults where only `adapters` is set; None
        when the model serves no adapter."""
        if self.lora is None and self.adapters:
            return LoraOptions()
        return self.lora

    @property
    def deployment_name(self) -> str:
        """A Ray Serve deployment name derived from the id: `mistralai/X` -> `mistralai--X`."""
        return _DEPLOYMENT_NAME_UNSAFE.sub("-", self.id.replace("/", "--"))

    @property
    def max_num_seqs(self) -> int:
        """Sequences one engine runs at once: the replica's real capacity."""
        return int(self.engine_args.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)

    @property
    def max_ongoing_requests(self) -> int:
        return self.deployment.max_ongoing_requests or self.max_num_seqs

    @property
    def target_ongoing_requests(self) -> float:
        auto = self.deployment.autoscaling
        if auto is not None and auto.target_ongoing_requests is not None:
            return auto.target_ongoing_requests
        return max(1.0, 0.75 * self.max_num_seqs)

    @property
    def graceful_shutdown_timeout_s(self) -> float:
        if self.deployment.graceful_shutdown_timeout_s is not None:
            return self.deployment.graceful_shutdown_timeout_s
        max_len = int(self.engine_args.get("max_model_len") or 32768)
        return min(3600.0, max(60.0, max_len / 20))

    @property
    def frontend_count(self) -> int:
        """vLLM frontend processes per replica (`frontends`, else from `num_cpus`)."""
        if self.engine != "vllm":
            return 1
        if self.frontends is not None:
            return self.frontends
        return max(1, math.floor(self.num_cpus) - 1)

    @property
    def gpu_memory_share(self) -> float:
        """Share of its GPU's memory one replica uses awake (what a GPU lease counts)."""
        if self.warm_tier is not None and self.warm_tier.gpu_memory_share is not None:
            return self.warm_tier.gpu_memory_share
        return float(self.engine_args.get("gpu_memory_utilization", VLLM_GPU_MEMORY_UTILIZATION))

    @property
    def gpus_per_replica(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        tp = int(self.engine_args.get("tensor_parallel_size", 1))
        pp = int(self.engine_args.get("pipeline_parallel_size", 1))
        return float(tp * pp)
