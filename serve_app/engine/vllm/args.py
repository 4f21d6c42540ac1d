"""A model config as vLLM's arguments: the namespace `vllm serve` would parse, and vLLM's own
checks of it, run when the application is built (without loading the model)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import sys
import typing
from argparse import Namespace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from serve_app.config import ConfigError, ModelConfig
from serve_app.config.model import is_local_source
from serve_app.engine.vllm.compat import CLI_ARGS_MODULES, import_first

# vLLM's allow-list of media hosts where the config allows none (vLLM reads [] as any host).
NO_MEDIA_HOST = "no-remote-media.invalid"


@functools.cache
def _default_namespace() -> Namespace:
    """The arguments `vllm serve` would have with no flags, from vLLM's own parser."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    make_arg_parser = import_first(CLI_ARGS_MODULES, "make_arg_parser")
    return make_arg_parser(FlexibleArgumentParser()).parse_args([])


@functools.cache
def engine_arg_names() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


@functools.cache
def server_arg_names() -> frozenset[str]:
    """Options of vLLM's OpenAI server that are not engine arguments."""
    return frozenset(vars(_default_namespace())) - engine_arg_names() - {"model_tag", "config"}


def _check_keys(kind: str, given: dict[str, Any], allowed: frozenset[str], model_id: str) -> None:
    for key in given:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"model '{model_id}': {kind}.{key}: not a vLLM {kind[:-5]} argument{suggestion}"
            )


def build_namespace(config: ModelConfig) -> Namespace:
    """The argument namespace `vllm serve SOURCE --flags...` would produce for this model."""
    _check_keys("engine_args", config.engine_args, engine_arg_names(), config.id)
    _check_keys("server_args", config.server_args, server_arg_names(), config.id)
    ns = copy.deepcopy(_default_namespace())
    ns.model = config.source
    ns.served_model_name = list(config.names)
    for key, value in {**config.engine_args, **config.server_args}.items():
        setattr(ns, key, value)
    if (lora := config.lora_options) is not None:
        # Adapters load at run time (serve_app.serving.adapters), none at start.
        ns.enable_lora = True
        ns.max_loras = lora.max_loras
        ns.max_lora_rank = lora.max_lora_rank
        ns.max_cpu_loras = lora.adapters_per_replica
    if config.warm_tier is not None:
        # The warm tier parks the engine with vLLM's sleep mode, in its share of the GPU.
        ns.enable_sleep_mode = True
        ns.gpu_memory_utilization = config.gpu_memory_share
    if "allowed_media_domains" in engine_arg_names():
        # vLLM's own allow-list too, as a second line behind serve_app.guards.media's check.
        # vLLM reads an empty list as "any host": with no host allowed, it gets one that never
        # resolves (RFC 6761's `.invalid`).
        ns.allowed_media_domains = list(config.media.allowed_remote_hosts) or [NO_MEDIA_HOST]
    return ns


@functools.cache
def _engine_arg_types() -> dict[str, TypeAdapter[Any]]:
    """A pydantic validator per engine argument, from AsyncEngineArgs' own annotations.

    The annotations are strings (`from __future__ import annotations`) naming types of vLLM's
    module; `typing.get_type_hints` resolves them there, one field at a time, because a few
    name types that module imports only for type checkers, which would fail all of them at once.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    module = EngineArgs.__module__
    adapters: dict[str, TypeAdapter[Any]] = {}
    for field in dataclasses.fields(AsyncEngineArgs):
        holder = type("_Field", (), {"__annotations__": {field.name: field.type}, "__module__": module})
        try:
            hint = typing.get_type_hints(holder, globalns=vars(sys.modules[module]))[field.name]
            adapters[field.name] = TypeAdapter(hint)
        except Exception:  # an annotation pydantic cannot check (e.g. torch.dtype): vLLM checks it
            continue
    return adapters


def engine_args(ns: Namespace) -> Any:
    """vLLM's `AsyncEngineArgs` of a namespace, as `vllm serve` makes them."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(ns)


def validate_engine_args(config: ModelConfig) -> None:
    """Check a model's engine and server arguments the way vLLM does, without loading it."""
    ns = build_namespace(config)
    types = _engine_arg_types()
    for key, value in config.engine_args.items():
        if key in types:
            try:
                types[key].validate_python(value)
            except ValidationError as exc:
                msg = exc.errors(include_url=False)[0]["msg"]
                raise ConfigError(f"model '{config.id}': engine_args.{key}: {msg}") from None
    try:
        engine_args(ns)
    except Exception as exc:  # vLLM raises ValueError, TypeError, pydantic errors...
        raise ConfigError(f"model '{config.id}': engine_args: {exc}") from None


def sleep_unsupported(config: ModelConfig) -> str | None:
    """Why vLLM cannot sleep with this model's placement (its sleep mode needs a CUDA or ROCm GPU)."""
    if config.gpus_per_replica == 0:
        return "vLLM's sleep mode runs on GPUs only, and this model runs on the CPU (num_gpus: 0)"
    return None


def check_source(config: ModelConfig) -> None:
    """A local source must be a directory; anything else is a Hugging Face repository id."""
    source = config.source
    if is_local_source(source) and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(
            f"model '{config.id}': source directory {source} does not exist "
            "(for the demo models run `make models`)"
        )
