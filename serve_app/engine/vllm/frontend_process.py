"""One frontend process of a model replica: a `VLLMEngine` on a shared engine core, serving the
replica over a Unix socket (serve_app.engine.vllm.wire).

vLLM starts it as it starts each API server of `vllm serve --api-server-count N`
(`APIServerProcessManager`, `target_server_fn=run_frontend`), with a `client_config` that makes
its `AsyncLLM` one of N clients of the replica's engine core. It runs our whole engine-side
path (vLLM's request models, our bounds and media checks, the patches of
serve_app.engine.vllm.patches, request ids, usage), so each frontend behaves as the replica's
own engine does with one frontend.

It binds its socket only once its engine has started: a socket that accepts is a ready
frontend. It ends when the replica that started it is gone (the replica's reaper also kills
it, serve_app.serving.reaper).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import traceback
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from serve_app.config import ModelConfig, RequestLimits
from serve_app.engine.protocol import Route
from serve_app.engine.vllm import wire
from serve_app.engine.vllm.engine import VLLMEngine
from serve_app.guards.adapters import AdapterError

logger = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0


@dataclass(frozen=True)
class FrontendSpec:
    """What a frontend needs beyond vLLM's arguments; it travels on the argument namespace."""

    config: ModelConfig
    limits: RequestLimits
    socket_dir: str

    def socket_path(self, index: int) -> Path:
        return Path(self.socket_dir) / f"frontend-{index}.sock"


SPEC_ATTRIBUTE = "mistral_serve_frontend"


def run_frontend(listen_address: str, sock: Any, args: Any, client_config: dict[str, Any]) -> None:
    """The process's entry point, called as vLLM calls an API server's."""
    spec: FrontendSpec = getattr(args, SPEC_ATTRIBUTE)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s frontend: %(message)s")
    import uvloop  # vLLM's own API servers run on it (a vLLM dependency)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(spec, client_config))


async def _serve(spec: FrontendSpec, client_config: dict[str, Any]) -> None:
    index = int(client_config["client_index"])
    parent = os.getppid()
    engine = VLLMEngine(spec.config, client_config=client_config)
    engine.limits = spec.limits
    await engine.start()
    path = spec.socket_path(index)
    server = await asyncio.start_unix_server(
        lambda reader, writer: _answer(engine, reader, writer), path=str(path)
    )
    logger.info("frontend %d of model %s serves on %s", index, spec.config.id, path)
    try:
        # The replica is gone (this process was handed to another parent): end. No event says
        # so, hence the poll.
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(PARENT_CHECK_S)
        logger.warning("frontend %d: the replica that started it is gone; ending", index)
    finally:
        server.close()
        await engine.shutdown()


async def _answer(engine: VLLMEngine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one connection: one call."""
    try:
        call = await wire.read_item(reader)
        if not isinstance(call, wire.Call):
            raise wire.FrontendError(f"not a call: {type(call).__name__}")
        if call.op == "handle":
            await _until_closed(reader, _stream(engine, writer, *call.args))
        else:
            writer.write(wire.item_frame(await _call(engine, call)) + wire.end_frame())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the replica went away
    except Exception as exc:
        logger.warning("frontend call failed: %s", traceback.format_exc(limit=5))
        with contextlib.suppress(ConnectionError):
            writer.write(wire.error_frame(f"{type(exc).__name__}: {exc}"))
            await writer.drain()
    finally:
        writer.close()


async def _call(engine: VLLMEngine, call: wire.Call) -> Any:
    if call.op == "load":
        return engine.load()
    if call.op == "alive":
        return await engine.check_alive()
    if call.op == "probe":
        return await engine.probe()
    if call.op == "info":
        return engine.info()
    if call.op == "sleep":
        return await engine.sleep()
    if call.op == "wake_up":
        return await engine.wake_up()
    if call.op == "reset_mm_cache":
        return await engine.reset_mm_cache()
    if call.op == "add_adapter":
        try:
            return await engine.add_adapter(*call.args)
        except AdapterError as exc:  # the replica raises it again
            return exc
    if call.op == "remove_adapter":
        return await engine.remove_adapter(*call.args)
    if call.op == "facts":
        return {
            "pid": os.getpid(),
            "patches": engine.patches,
            "in_flight": engine.load().in_flight,
            "max_image_pixels": int(os.environ["VLLM_MAX_IMAGE_PIXELS"]),
        }
    raise wire.FrontendError(f"unknown call {call.op!r}")


async def _stream(
    engine: VLLMEngine, writer: asyncio.StreamWriter, route: str, body: bytes, request_id: str
) -> None:
    """Stream one request's items to the replica, then the end frame."""
    items = cast(AsyncGenerator[Any, None], engine.handle(Route(route), body, request_id))
    async with contextlib.aclosing(items):
        async for item in items:
            writer.write(wire.item_frame(item))
            await writer.drain()
    writer.write(wire.end_frame())
    await writer.drain()


async def _until_closed(reader: asyncio.StreamReader, work: Any) -> None:
    """Run `work`; cancel it as soon as the replica closes the connection (its client left),
    which aborts the request in the engine."""
    task = asyncio.ensure_future(work)
    closed = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()
