"""The serving path in this process, without Ray: model servers with their engines, handles
that call them as Serve's handles would, and the ingress's FastAPI app in front of them.

A `LocalHandle` runs each call as a task of its own, as a replica runs it apart from its
caller: `cancel()` cancels the task where it waits, as Serve cancels a replica's task when a
client leaves. Handles that fail (a dead replica, a full router queue, no replica) stand in for
what Serve's routers report.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from serve_app.config import AppConfig, ModelConfig, RequestLimits
from serve_app.engine.protocol import Engine
from serve_app.serving.adapter_registry import AdapterRegistry
from serve_app.serving.batches.service import BatchService
from serve_app.serving.builder import model_card, model_ids
from serve_app.serving.ingress import OpenAIIngress, openai_app
from serve_app.serving.server import ModelServer

T = TypeVar("T")
_END = object()


class LocalStream:
    """A `DeploymentResponseGenerator` stand-in: the source runs ahead in its own task."""

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(source))

    async def _pump(self, source: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(source) as items:  # type: ignore[type-var]
                async for item in items:
                    await self._queue.put(item)
        except asyncio.CancelledError:
            await self._queue.put(asyncio.CancelledError())
            raise
        except BaseException as exc:
            await self._queue.put(exc)
        else:
            await self._queue.put(_END)

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._task.cancel()

    @property
    def cancelled(self) -> bool:
        return self._task.cancelled()


class LocalResponse:
    """A `DeploymentResponse` stand-in: awaitable, cancellable."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._task = asyncio.ensure_future(coro)

    def __await__(self) -> Any:
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()


class LocalHandle:
    """A `DeploymentHandle` stand-in that calls `target`'s methods in this process."""

    def __init__(self, target: Any, method: str = "__call__", stream: bool = False) -> None:
        self._target, self._method, self._stream = target, method, stream
        self.calls: list[tuple[Any, ...]] = []  # the arguments of each streamed call (generate)
        self.keywords: list[dict[str, Any]] = []  # and its keyword arguments

    def options(self, *, method_name: str | None = None, stream: bool | None = None, **_: Any) -> LocalHandle:
        handle = LocalHandle(
            self._target, method_name or self._method, self._stream if stream is None else stream
        )
        handle.calls, handle.keywords = self.calls, self.keywords
        return handle

    def __getattr__(self, name: str) -> LocalHandle:  # handle.model_info.remote()
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> LocalStream | LocalResponse:
        if self._stream:  # requests to the model (generate), for tests to read
            self.calls.append(args)
            self.keywords.append(kwargs)
        result = getattr(self._target, self._method)(*args, **kwargs)
        return LocalStream(result) if self._stream else LocalResponse(result)


class FailingReplicas:
    """A model whose replicas fail each call as told: `failures` holds one entry per call to come,
    an exception to raise before the first item (a dead replica, Serve's BackPressureError) or
    `"hang"` (no replica ever takes the call); calls past the list go to `server`."""

    def __init__(self, server: ModelServer, failures: list[BaseException | str]) -> None:
        self.server = server
        self.failures = failures

    def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        failure = self.failures.pop(0) if self.failures else None
        if failure is None:
            return self.server.generate(*args, **kwargs)
        return _failing(failure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


async def _failing(failure: BaseException | str) -> AsyncIterator[Any]:
    if failure == "hang":
        await asyncio.Event().wait()
    assert isinstance(failure, BaseException)
    raise failure
    yield  # an async generator


class LocalModelServer(ModelServer):
    """A model replica in this process. Serve awaits a replica's async `__del__` when it stops
    the replica; here `stop()` does, and the collector's own call finds nothing left to do."""

    def __del__(self) -> None:  # type: ignore[override]
        pass

    async def stop(self) -> None:
        await ModelServer.__del__(self)


async def start_server(
    model: ModelConfig,
    limits: RequestLimits | None = None,
    engine_cls: type[Engine] | None = None,
    **options: Any,
) -> LocalModelServer:
    """A model replica in this process, its engine started (Serve calls the async constructor);
    `options`: ModelServer's keyword arguments."""
    server = LocalModelServer.__new__(LocalModelServer)
    await server.__init__(model, engine_cls, limits, **options)  # type: ignore[misc]
    return server


@dataclass
class InProcessApp:
    """The ingress app and the model servers behind it; `client()` speaks HTTP to it."""

    app: FastAPI
    ingress: OpenAIIngress
    servers: dict[str, LocalModelServer]
    handles: dict[str, LocalHandle] = field(default_factory=dict)
    batches: LocalBatchService | None = None  # the batch service, where the app was built with one

    def client(self, headers: Mapping[str, str] | None = None) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        # A loopback host, as a keyless app requires (serve_app.guards.origin).
        return httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=headers, timeout=30
        )

    async def close(self) -> None:
        if self.batches is not None:
            await self.batches.stop()
        for server in self.servers.values():
            await server.stop()


async def in_process_app(
    config: AppConfig,
    wrap: Callable[[str, ModelServer], Any] = lambda _name, server: server,
    batches: bool = False,
) -> InProcessApp:
    """`config`'s app in this process: one model server per model (`wrap` may stand a failing
    stand-in in front of one, by deployment name) and the ingress as the builder binds it;
    `batches`: with the batch service too (its store: the config's `batches.store`)."""
    servers = {m.deployment_name: await start_server(m, config.limits) for m in config.models}
    handles = {name: LocalHandle(wrap(name, server)) for name, server in servers.items()}
    service_handle = LocalHandle(None)  # the batch service, made once the ingress is
    # The book of runtime adapters, where the builder would bind one.
    with_registry = config.auth.admin is not None and any(m.lora_options for m in config.models)
    ingress = OpenAIIngress(
        handles,  # type: ignore[arg-type]
        [model_card(m) for m in config.models],
        config.auth,
        config.observability,
        config.quotas.share(config.ingress.num_replicas),
        config.limits,
        LocalHandle(AdapterRegistry()) if with_registry else None,  # type: ignore[arg-type]
        service_handle if batches else None,  # type: ignore[arg-type]
        config.batches,
    )
    service = await start_batch_service(config, ingress.batch_line) if batches else None
    service_handle._target = service
    app = openai_app(lambda name: getattr(ingress, name), config.auth.cors_allow_origins)
    return InProcessApp(app, ingress, servers, handles, service)


class LocalBatchService(BatchService):
    """The batch service in this process: `stop()` does what Serve's call of `__del__` does."""

    def __del__(self) -> None:  # type: ignore[override]
        pass

    async def stop(self) -> None:
        await BatchService.__del__(self)


async def start_batch_service(config: AppConfig, send: Any) -> LocalBatchService:
    """The batch service of `config` in this process, sending its requests with `send` (an
    ingress's `batch_line`, or a stand-in); it resumes what its store holds unfinished."""
    service = LocalBatchService.__new__(LocalBatchService)
    await service.__init__(config.batches, config.limits, model_ids(config), send=send)  # type: ignore[misc]
    return service


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async test scenario on a fresh event loop."""
    return asyncio.run(scenario())


# --- building apps for tests --------------------------------------------------------------------

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def fake(model_id: str, **options: Any) -> dict[str, Any]:
    """A model entry on the fake engine, fast unless told otherwise."""
    engine_args = {"ttft_s": 0.0, "tokens_per_s": 2000.0, "max_num_seqs": 16}
    engine_args.update(options.pop("engine_args", {}))
    return {
        "id": model_id,
        "source": "none",
        "engine": "fake",
        "num_gpus": 0,
        "engine_args": engine_args,
        **options,
    }


def config(*models: dict[str, Any], **app: Any) -> AppConfig:
    """An app config of `models` (one fake model "small" by default) and `app`'s options."""
    from serve_app.config import load_app_config

    return load_app_config({"models": list(models) or [fake("small")], **app})


def chat(model: str = "small", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI, "max_tokens": 3, **fields}


async def _with_app(cfg: AppConfig, scenario: Callable[[InProcessApp], Any], **wrap: Any) -> Any:
    app = await in_process_app(cfg, **wrap)
    try:
        return await scenario(app)
    finally:
        await app.close()


def serve(cfg: AppConfig, scenario: Callable[[InProcessApp], Any], **wrap: Any) -> Any:
    """Run `scenario(app)` against `cfg`'s app in this process, then stop it."""
    return run(lambda: _with_app(cfg, scenario, **wrap))


def sse(text: str) -> list[str]:
    """The `data:` payloads of a whole SSE body."""
    events = text.split("\n\n")
    assert events[-1] == "", text
    return [event.removeprefix("data: ") for event in events[:-1]]


@contextlib.asynccontextmanager
async def over_http(app: FastAPI, body_read: list[int] | None = None) -> AsyncIterator[str]:
    """`app` served by uvicorn on a free loopback port, in this event loop: a real HTTP
    server, where a client can send a body slowly or leave mid-stream. `body_read` gets the
    size of each piece of a request body the app read."""
    import socket

    import uvicorn

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        async def received() -> Any:
            message = await receive()
            if message["type"] == "http.request" and body_read is not None:
                body_read.append(len(message.get("body", b"")))
            return message

        await app(scope, received, send)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(counting, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), "the test server did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
