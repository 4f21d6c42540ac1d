"""Application configuration: YAML in, strict pydantic models out.

An application config is the `args` of the application in a Ray Serve config file (the
file `serve deploy` takes), or a bare mapping with the same keys. It lists models inline
or as paths to model files (`configs/models/*.yaml`). Every model is validated on its
own, so an error names the file and the field it comes from.

This module imports neither Ray nor vLLM: the vLLM engine arguments are checked by
`serve_app.engine.vllm_engine.validate_engine_args` when the application is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILDER_IMPORT_PATH = "serve_app.builder:build_app"

# vLLM's usual max_num_seqs on a GPU; set engine_args.max_num_seqs to size a model exactly.
DEFAULT_MAX_NUM_SEQS = 256


class ConfigError(ValueError):
    """A configuration that cannot be served. The message names the file and the field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingOptions(StrictModel):
    """Autoscaling of one model, driven by mistral-serve's LLM-aware policy.

    The policy (serve_app.autoscaling) sizes the deployment by the larger of the requests
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
    def gpus_per_replica(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        tp = int(self.engine_args.get("tensor_parallel_size", 1))
        pp = int(self.engine_args.get("pipeline_parallel_size", 1))
        return float(tp * pp)


class IngressOptions(StrictModel):
    """Ray Serve options of the OpenAI-compatible ingress deployment."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Requests one ingress replica handles at once.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves for each ingress replica.")


class AuthOptions(StrictModel):
    """API keys and cross-origin access."""

    api_keys: tuple[str, ...] = Field(
        (),
        description="Accepted keys as sha256:<hex> hashes (`python -m serve_app hash-key KEY`); "
        "never plain keys in a config file.",
    )
    api_keys_env: str | None = Field(
        None,
        description="An environment variable (of the ingress replicas) holding plain keys, comma-separated.",
    )
    api_keys_file: str | None = Field(
        None, description="A file (on the ingress replicas' nodes) holding plain keys, one per line."
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Serve beyond loopback with no key configured (e.g. behind an authenticating gateway).",
    )
    cors_allow_origins: tuple[str, ...] = Field(
        (), description="Origins browsers may call the API from; none (the default) closes CORS."
    )

    @property
    def configured(self) -> bool:
        """Whether any source of keys is set (the keys themselves are read by the ingress)."""
        return bool(self.api_keys or self.api_keys_env or self.api_keys_file)

    @field_validator("api_keys")
    @classmethod
    def _hashes_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
                raise ValueError("api_keys holds sha256:<64 hex digits> hashes, not plain keys")
        return value


class QuotaLimits(StrictModel):
    """Limits of one key (or of one key on one model); unset means no limit."""

    requests_per_minute: float | None = Field(None, gt=0, description="Requests started per minute.")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Prompt plus completion tokens per minute."
    )
    concurrent_requests: int | None = Field(None, ge=1, description="Requests in progress at once.")

    def merged(self, fallback: QuotaLimits) -> QuotaLimits:
        """These limits, with `fallback`'s where these are unset."""
        return QuotaLimits(
            requests_per_minute=self.requests_per_minute or fallback.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute or fallback.tokens_per_minute,
            concurrent_requests=self.concurrent_requests or fallback.concurrent_requests,
        )

    def divided(self, parts: int) -> QuotaLimits:
        def part(value: float | None) -> float | None:
            return None if value is None else value / parts

        concurrent = self.concurrent_requests
        return QuotaLimits(
            requests_per_minute=part(self.requests_per_minute),
            tokens_per_minute=part(self.tokens_per_minute),
            concurrent_requests=None if concurrent is None else max(1, math.ceil(concurrent / parts)),
        )


class KeyQuota(QuotaLimits):
    """One key's limits, its scheduling priority, and limits on single models."""

    priority: int | None = Field(
        None,
        description="vLLM scheduling priority of this key's requests (lower runs first), for "
        "models whose engine_args set scheduling_policy: priority; overrides the client's.",
    )
    models: dict[str, QuotaLimits] = Field(
        default_factory=dict, description="Limits of this key on one model (by model id)."
    )


class QuotaOptions(StrictModel):
    """Quotas per API key: `default` applies to every key, `keys` (by hash) override it."""

    default: QuotaLimits = Field(default_factory=QuotaLimits, description="Limits of every key.")
    keys: dict[str, KeyQuota] = Field(
        default_factory=dict,
        description="Limits of single keys, by their sha256:<hex> hash (python -m serve_app hash-key KEY).",
    )

    @field_validator("keys")
    @classmethod
    def _hashes_only(cls, value: dict[str, KeyQuota]) -> dict[str, KeyQuota]:
        for key in value:
            if not (key.startswith("sha256:") and len(key) == 71):
                raise ValueError(f"quota keys are sha256:<64 hex digits> hashes, not {key[:12]!r}...")
        return value

    @property
    def enabled(self) -> bool:
        return self != QuotaOptions()

    def share(self, replicas: int) -> QuotaOptions:
        """The share of these limits one of `replicas` ingress replicas enforces."""
        if replicas <= 1:
            return self
        return QuotaOptions(
            default=self.default.divided(replicas),
            keys={
                k: KeyQuota(
                    **q.divided(replicas).model_dump(),
                    priority=q.priority,
                    models={m: limits.divided(replicas) for m, limits in q.models.items()},
                )
                for k, q in self.keys.items()
            },
        )


class RequestLimits(StrictModel):
    """Bounds on one request, enforced by the ingress before the request reaches a model.

    The defaults leave room for every ordinary request (long contexts, big tool sets,
    multimodal parts) while keeping one request from tying up the ingress or an engine.
    """

    max_body_bytes: int = Field(
        1_048_576, ge=1, description="Largest request body, in bytes; a larger one gets 413."
    )
    max_header_bytes: int = Field(
        8_192,
        ge=1,
        description="Largest sum of the lengths of the header names and values (Serve's HTTP "
        "server itself refuses a request head over 16 KiB).",
    )
    max_n: int = Field(8, ge=1, description="Most choices one request may ask for (`n`, `best_of`).")
    max_top_logprobs: int | None = Field(
        None,
        ge=0,
        description="Most log-probabilities per token (chat `top_logprobs`, completions `logprobs`). "
        "Unset: vLLM's `max_logprobs` engine argument (20 by default) bounds it, with vLLM's error.",
    )
    max_messages: int = Field(512, ge=1, description="Most messages in a chat request.")
    max_message_chars: int = Field(
        512_000,
        ge=1,
        description="Most characters of text in one message (its text parts summed), and in one "
        "completions prompt string.",
    )
    max_stop: int = Field(16, ge=0, description="Most stop sequences; 0 allows none.")
    max_stop_chars: int = Field(256, ge=1, description="Longest stop sequence, in characters.")
    max_tools: int = Field(128, ge=0, description="Most tools in a chat request; 0 allows none.")
    max_tool_schema_bytes: int = Field(
        65_536, ge=1, description="Largest tool definition, as compact JSON, in bytes."
    )
    max_response_schema_bytes: int = Field(
        65_536,
        ge=1,
        description="Largest `response_format.json_schema`, as compact JSON, in bytes.",
    )
    max_prompt_items: int = Field(
        256,
        ge=1,
        description="Most prompts in one completions request (a list of strings or of token-id "
        "lists); a single prompt of token ids may be as long as the body allows.",
    )


class ObservabilityOptions(StrictModel):
    """Logs of requests (metrics are always exported through Ray)."""

    access_log: bool = Field(
        True, description="One JSON line per request on the ingress replicas' stdout (no text)."
    )
    log_request_text: bool = Field(
        False,
        description="Add each request's body and its response text to the access log. Off by "
        "default: prompts and completions may hold secrets and personal data.",
    )


class AppConfig(StrictModel):
    """The whole application: the models and the ingress in front of them."""

    models: tuple[ModelConfig, ...] = Field(min_length=1, description="The models to serve.")
    ingress: IngressOptions = Field(
        default_factory=IngressOptions, description="Options of the ingress deployment."
    )
    auth: AuthOptions = Field(default_factory=AuthOptions, description="API keys and CORS.")
    observability: ObservabilityOptions = Field(
        default_factory=ObservabilityOptions, description="Access logs."
    )
    quotas: QuotaOptions = Field(
        default_factory=QuotaOptions, description="Per-key request, token and concurrency limits."
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits, description="Bounds on one request, checked before any engine work."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        seen: dict[str, str] = {}
        deployments: dict[str, str] = {}
        for model in self.models:
            for name in model.names:
                if name in seen:
                    raise ValueError(
                        f"model name '{name}' is used twice (by '{seen[name]}' and '{model.id}')"
                    )
                seen[name] = model.id
            dep = model.deployment_name
            if dep in deployments:
                raise ValueError(
                    f"models '{deployments[dep]}' and '{model.id}' map to the same deployment name '{dep}'"
                )
            deployments[dep] = model.id
        return self

    def find(self, name: str) -> ModelConfig | None:
        for model in self.models:
            if name in model.names:
                return model
        return None


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _format_errors(source: str, err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]))
        if prefix:
            loc = prefix if loc == "(top level)" else f"{prefix}.{loc}"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _load_model(entry: Any, index: int, source: str, base_dir: Path) -> ModelConfig:
    where, prefix = source, f"models[{index}]"
    if isinstance(entry, str):
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        entry = read_yaml(path)
        where, prefix = str(path), ""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: {prefix or '(top level)'}: a model must be a mapping or a file path")
    try:
        return ModelConfig.model_validate(dict(entry))
    except ValidationError as exc:
        raise ConfigError(_format_errors(where, exc, prefix)) from None


def load_app_config(
    args: Any, *, source: str = "application args", base_dir: Path | None = None
) -> AppConfig:
    """Validate application args (the `args:` of a Serve application).

    Model entries that are strings are paths to model files, relative to `base_dir`
    (default: the current directory, which is the working_dir on a Ray cluster).
    """
    if isinstance(args, AppConfig):
        return args
    if not isinstance(args, Mapping):
        raise ConfigError(f"{source}: (top level): expected a mapping with a `models` list")
    base = base_dir or Path.cwd()
    raw = dict(args)
    models = raw.get("models")
    if isinstance(models, list):
        raw["models"] = [_load_model(m, i, source, base) for i, m in enumerate(models)]
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


class ServeFile(BaseModel):
    """The parts of a Ray Serve config file that `serve_app run` reads."""

    model_config = ConfigDict(extra="allow")

    path: Path
    http_host: str
    http_port: int
    app_name: str
    route_prefix: str
    args: dict[str, Any]


def load_serve_file(path: Path) -> ServeFile:
    """Read a Ray Serve config file and pick the application built by this package."""
    data = read_yaml(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("applications"), list):
        raise ConfigError(f"{path}: (top level): a Serve config needs an `applications` list")
    ours = [
        (i, a)
        for i, a in enumerate(data["applications"])
        if isinstance(a, Mapping) and a.get("import_path") == BUILDER_IMPORT_PATH
    ]
    if len(ours) != 1:
        raise ConfigError(
            f"{path}: applications: expected exactly one application with "
            f"import_path '{BUILDER_IMPORT_PATH}', found {len(ours)}"
        )
    index, app = ours[0]
    http = data.get("http_options") or {}
    if not isinstance(http, Mapping):
        raise ConfigError(f"{path}: http_options: must be a mapping")
    args = app.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{path}: applications[{index}].args: must be a mapping")
    return ServeFile(
        path=path,
        http_host=str(http.get("host", "127.0.0.1")),
        http_port=int(http.get("port", 8000)),
        app_name=str(app.get("name", "default")),
        route_prefix=str(app.get("route_prefix", "/")),
        args=dict(args),
    )
