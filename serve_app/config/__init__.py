"""Application configuration: YAML in, strict pydantic models out.

An application config is the `args` of the application in a Ray Serve config file (the
file `serve deploy` takes), or a bare mapping with the same keys. It lists models inline
or as paths to model files (`configs/models/*.yaml`). Every model is validated on its
own, so an error names the file and the field it comes from.

- `model`: one served model (`ModelConfig`) and its deployment and autoscaling options;
- `batches`: offline batches (OpenAI's Batch API);
- `guards`: API keys, quotas and the bounds on one request;
- `app`: the whole application (`AppConfig`) and its ingress;
- `files`: reading application args and Serve config files.

This package imports neither Ray nor vLLM: the vLLM engine arguments are checked by the vLLM
engine's `validate` (serve_app.engine.vllm.args) when the application is built.
"""

from serve_app.config.app import AppConfig, IngressOptions, ObservabilityOptions
from serve_app.config.base import ConfigError, StrictModel
from serve_app.config.batches import BatchOptions
from serve_app.config.files import (
    BUILDER_IMPORT_PATH,
    ServeFile,
    load_app_config,
    load_serve_file,
    read_yaml,
)
from serve_app.config.guards import (
    AuthOptions,
    KeyQuota,
    KeySources,
    QuotaLimits,
    QuotaOptions,
    RequestLimits,
)
from serve_app.config.model import (
    DEFAULT_MAX_NUM_SEQS,
    AdapterConfig,
    AutoscalingOptions,
    DeploymentOptions,
    LoraOptions,
    MediaOptions,
    ModelConfig,
    WarmTierOptions,
)

__all__ = [
    "BUILDER_IMPORT_PATH",
    "DEFAULT_MAX_NUM_SEQS",
    "AdapterConfig",
    "AppConfig",
    "AuthOptions",
    "AutoscalingOptions",
    "BatchOptions",
    "ConfigError",
    "DeploymentOptions",
    "IngressOptions",
    "KeyQuota",
    "KeySources",
    "LoraOptions",
    "MediaOptions",
    "ModelConfig",
    "ObservabilityOptions",
    "QuotaLimits",
    "QuotaOptions",
    "RequestLimits",
    "ServeFile",
    "StrictModel",
    "WarmTierOptions",
    "load_app_config",
    "load_serve_file",
    "read_yaml",
]
