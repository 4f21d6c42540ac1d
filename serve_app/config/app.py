"""The whole application: its models, the ingress in front of them, and the guards' options."""

from __future__ import annotations

from pydantic import Field, model_validator

from serve_app.config.base import StrictModel
from serve_app.config.batches import BatchOptions
from serve_app.config.guards import AuthOptions, QuotaOptions, RequestLimits
from serve_app.config.model import ModelConfig


class IngressOptions(StrictModel):
    """Ray Serve options of the OpenAI-compatible ingress deployment."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Requests one ingress replica handles at once.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves for each ingress replica.")


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
    batches: BatchOptions = Field(
        default_factory=BatchOptions, description="Offline batches: OpenAI's Batch API and its store."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        seen: dict[str, str] = {}
        deployments: dict[str, str] = {}
        for model in self.models:
            for name in (*model.names, *model.adapter_names):
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
