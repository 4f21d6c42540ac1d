"""Options of the guards (serve_app.guards): API keys, quotas and bounds on one request."""

from __future__ import annotations

import math
import re

from pydantic import Field, field_validator

from serve_app.config.base import StrictModel


class KeySources(StrictModel):
    """Where accepted API keys come from: hashes in the config, a variable, a file."""

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


class AuthOptions(KeySources):
    """API keys, the admin routes' keys, and cross-origin access."""

    allow_unauthenticated: bool = Field(
        False,
        description="Serve beyond loopback with no key configured (e.g. behind an authenticating gateway).",
    )
    cors_allow_origins: tuple[str, ...] = Field(
        (), description="Origins browsers may call the API from; none (the default) closes CORS."
    )
    admin: KeySources | None = Field(
        None,
        description="Keys of the admin routes (/v1/load_lora_adapter, /v1/unload_lora_adapter), "
        "apart from the API keys: the routes answer 404 unless set, and always ask for one of these keys.",
    )

    @field_validator("admin")
    @classmethod
    def _admin_has_keys(cls, value: KeySources | None) -> KeySources | None:
        if value is not None and not value.configured:
            raise ValueError("admin: give api_keys, api_keys_env or api_keys_file (or leave admin out)")
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
    """Bounds on one request. The ingress checks the sizes of the headers and the body before it
    forwards anything; the model replica checks the rest before any engine work, once vLLM's
    request model has accepted the body (serve_app.guards.limits says where each is checked).

    The defaults leave room for every ordinary request (long contexts, big tool sets,
    multimodal parts) while keeping one request from tying up the ingress or an engine.
    """

    max_body_bytes: int = Field(
        1_048_576,
        ge=1,
        description="Largest request body, in bytes; a larger one gets 413, as soon as the ingress has "
        "read that much of it (or at once, when the client declares a larger Content-Length).",
    )
    max_body_seconds: float = Field(
        30.0,
        gt=0,
        description="Seconds a client has to send its whole request body; a slower one gets 408.",
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
    max_tools_bytes: int = Field(
        262_144,
        ge=1,
        description="Largest sum of a chat request's tool definitions, as compact JSON, in bytes "
        "(vLLM turns them into one grammar when `tool_choice` is `required`).",
    )
    max_structured_output_bytes: int = Field(
        65_536,
        ge=1,
        description="Largest guided-decoding spec (`structured_outputs`: a JSON schema, regex, "
        "grammar or choices; or the older `guided_*` fields), as compact JSON, in bytes.",
    )
    max_logit_bias: int = Field(300, ge=0, description="Most tokens in `logit_bias` (OpenAI's own limit).")
    max_token_ids: int = Field(
        4096,
        ge=0,
        description="Most token ids in each of `allowed_token_ids`, `stop_token_ids` and "
        "`logprob_token_ids`.",
    )
    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="Most pixels (width x height) of an inline (data: URL) image, read from its "
        "header before it is decoded: a small file can decode to hundreds of MB.",
    )
