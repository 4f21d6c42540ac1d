"""The plain `vllm serve` command line for a model of our config (no vLLM import)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.config import ModelConfig


def vllm_serve_args(model: ModelConfig, port: int) -> list[str]:
    """The `vllm serve` command line for the same model and engine arguments as our app.

    Each engine and server argument becomes a flag: `True` a bare flag, `False` nothing,
    a dict or list its JSON, anything else its `str`.
    """
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model.source]
    args += ["--served-model-name", *model.names, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in {**model.engine_args, **model.server_args}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return args
