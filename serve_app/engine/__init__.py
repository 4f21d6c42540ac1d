"""Engines behind a model deployment: the contract (`protocol`), the vLLM engine (`vllm`) and a
fake one (`fake`) for load and scaling tests.

`engine_class` is the one place that maps a model's `engine` to its class; it imports the
engine only when asked, so that building the application imports no vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.config import ModelConfig
    from serve_app.engine.protocol import Engine

# A model config's `engine` -> "module:class".
ENGINES = {
    "vllm": "serve_app.engine.vllm.engine:VLLMEngine",
    "fake": "serve_app.engine.fake:FakeEngine",
}


def engine_class(name: str) -> type[Engine]:
    """The engine class a model config names."""
    try:
        module, cls = ENGINES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})") from None
    engine: type[Engine] = getattr(importlib.import_module(module), cls)
    return engine


def engine_for(config: ModelConfig) -> type[Engine]:
    """The engine class that runs `config` in a replica: its `engine`, and for vLLM with more
    than one frontend process, the engine core with its frontends."""
    if config.engine == "vllm" and config.frontend_count > 1:
        from serve_app.engine.vllm.frontends import VLLMFrontends

        return VLLMFrontends
    return engine_class(config.engine)
