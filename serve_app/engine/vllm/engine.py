"""The vLLM engine: one vLLM V1 `AsyncLLM` with vLLM's own OpenAI serving layer on top.

A replica runs one `AsyncLLM` and vLLM's own OpenAI serving objects for chat, completions and
tokenization, built by vLLM's own `init_app_state` from the same argument namespace that
`vllm serve` parses (`args`). Chat templates, sampling parameters, tool parsing and error
mapping are therefore vLLM's, and follow its versions (`compat` finds them in each release).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import psutil
from pydantic import BaseModel, ValidationError
from starlette.datastructures import State

from serve_app.config import ModelConfig
from serve_app.engine.protocol import AdapterRef, Engine, EngineStats, Head, ModelInfo, Route, Usage
from serve_app.engine.vllm import compat, openai_layer
from serve_app.engine.vllm.args import (
    build_namespace,
    check_source,
    engine_args,
    sleep_unsupported,
    validate_engine_args,
)
from serve_app.engine.vllm.patches import apply_all, json_coroutines
from serve_app.engine.vllm.stats import SchedulerSnapshot, ray_stat_logger
from serve_app.errors import error_body
from serve_app.guards.adapters import AdapterError
from serve_app.guards.limits import InputError, check_request
from serve_app.guards.media import MediaError, check_media

logger = logging.getLogger(__name__)

STALL_S = 60.0  # a busy engine that makes no step for this long is stuck
PROBE_TIMEOUT_S = 20.0  # an idle engine must generate one token within this


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.asynccontextmanager
async def _engine_client(
    args: Any, stat_loggers: list[Any], client_config: dict[str, Any] | None = None
) -> AsyncIterator[Any]:
    """vLLM's `AsyncLLM`, built as `vllm serve` builds it, with our stat loggers added.

    With `client_config` (one frontend of several, serve_app.engine.vllm.frontends) it is one
    of the clients of an engine core that another process started, as each API server process
    of `vllm serve --api-server-count N` is."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    clients: dict[str, Any] = {}
    if client_config is not None:
        addresses = dict(client_config)
        count, index = addresses.pop("client_count"), addresses.pop("client_index")
        addresses.pop("api_server_loads", None)  # vLLM's HTTP accept balancing: no HTTP here
        args._api_process_count, args._api_process_rank = count, index
        clients = {"client_addresses": addresses, "client_count": count, "client_index": index}
    vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    client = AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=stat_loggers,
        **compat.async_llm_options(args),
        **clients,
    )
    try:
        await client.reset_mm_cache()  # don't keep the profiling inputs in memory
        yield client
    finally:
        client.shutdown(timeout=compat.shutdown_timeout(vllm_config))


@dataclass(frozen=True, slots=True)
class Load:
    """What one `AsyncLLM` knows of its engine's load: its own unfinished requests, and the
    scheduler's figures of the last step it was told of (engine-wide)."""

    in_flight: int
    running: int
    waiting: int
    kv_cache_usage: float
    last_step: float  # time.monotonic() of the last engine step this client heard of
    prefix_cache_queries: int = 0  # prompt tokens this client heard were looked up in the cache
    prefix_cache_hits: int = 0  # and found there

    def stats(self, in_flight: int, prefix_cache: tuple[int, int] | None = None) -> EngineStats:
        """The engine's stats for `in_flight` unfinished requests. The scheduler's figures are
        those of its last step; the output processor knows at once when a request finished
        or was aborted, so it bounds them (an idle engine takes no step to report zero).
        `prefix_cache`: the prefix-cache (queries, hits) when more clients than this one heard
        of the engine's steps."""
        running = min(self.running, in_flight)
        queries, hits = prefix_cache or (self.prefix_cache_queries, self.prefix_cache_hits)
        return EngineStats(
            in_flight=in_flight,
            running=running,
            waiting=min(self.waiting, in_flight - running),
            kv_cache_usage=self.kv_cache_usage if in_flight else 0.0,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
        )


class StallWatch:
    """Tells a stuck engine from an idle one: a busy engine must make a step within STALL_S;
    an idle one is probed (it must generate a token)."""

    def __init__(self) -> None:
        self._busy_since: float | None = None

    def needs_probe(self, busy: bool, last_step: float) -> bool:
        """Whether to probe the engine (it is idle); raise if it is busy and stuck."""
        now = time.monotonic()
        if not busy:
            self._busy_since = None
            return True
        self._busy_since = self._busy_since or now
        stalled = now - max(last_step, self._busy_since)
        if stalled > STALL_S:
            raise RuntimeError(f"the engine has requests but made no step for {stalled:.0f} s")
        return False


class SleepGuard:
    """Whether an engine sleeps, and turns between its health probes and its sleeps and wakes:
    a probe sent into an engine that sleeps, or is going to sleep, would wait for a wake, and fail."""

    def __init__(self) -> None:
        self.asleep = False
        self._lock = asyncio.Lock()

    async def sleep(self, put_to_sleep: Callable[[], Awaitable[Any]]) -> None:
        async with self._lock:
            self.asleep = True  # from now on, no probe
            try:
                await put_to_sleep()
            except BaseException:
                self.asleep = False
                raise

    async def wake_up(self, wake: Callable[[], Awaitable[Any]]) -> None:
        async with self._lock:
            await wake()
            self.asleep = False  # only now may a probe generate

    async def probe(self, probe: Callable[[], Awaitable[Any]]) -> None:
        """Run `probe` unless the engine sleeps (or began to while the health check ran)."""
        async with self._lock:
            if not self.asleep:
                await probe()


class VLLMEngine(Engine):
    """vLLM's `AsyncLLM` with vLLM's OpenAI serving layer on top.

    `client_config`: this engine is one frontend of an engine core that another process runs
    (serve_app.engine.vllm.frontends); None: it starts its own engine core.
    """

    def __init__(self, config: ModelConfig, client_config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self._client_config = client_config
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._routes: openai_layer.Routes = {}
        self._models: Any = None  # vLLM's OpenAIServingModels: its lora_requests name the adapters
        self._scheduler = SchedulerSnapshot()
        self._stall = StallWatch()
        self._info: ModelInfo | None = None
        self._accepts_images = False
        self._namespace = Namespace()
        self._request_ids: set[str] = set()  # the ids of the requests running now
        self._core_pids: list[int] = []
        self.patches: list[str] = []  # the fixes of vLLM faults in place (.patches)
        self._sleep = SleepGuard()

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        validate_engine_args(config)

    @classmethod
    def sleep_unsupported(cls, config: ModelConfig) -> str | None:
        return sleep_unsupported(config)

    async def sleep(self) -> None:
        """vLLM's sleep level 1: weights to host memory, KV cache (and prefix cache) dropped. Its
        scheduler first lets a request in flight (a health probe) finish."""
        await self._sleep.sleep(lambda: compat.sleep(self._client, level=1))

    async def wake_up(self) -> None:
        await self._sleep.wake_up(self._client.wake_up)

    @property
    def asleep(self) -> bool:
        return self._sleep.asleep

    async def reset_mm_cache(self) -> None:
        """Forget which images the engine core holds (it dropped them when another client of
        it put it to sleep)."""
        await self._client.reset_mm_cache()

    async def start(self) -> None:
        check_source(self.config)
        ns = self._namespace = build_namespace(self.config)
        self.patches = apply_all()
        # vLLM 0.32 bounds the pixels of every image it decodes, those it fetches from an
        # allowed host included (0.24 leaves them to Pillow's decompression-bomb check): the
        # same bound as serve_app.guards.media's for data: URLs.
        os.environ["VLLM_MAX_IMAGE_PIXELS"] = str(self.limits.max_image_pixels)
        # vLLM's own metrics go to Ray's metrics endpoint when the engine runs under Ray.
        loggers = [self._scheduler.factory]
        if (ray_logger := ray_stat_logger()) is not None:
            loggers.insert(0, ray_logger)
        self._client = await self._stack.enter_async_context(
            _engine_client(engine_args(ns), loggers, self._client_config)
        )
        self._core_pids = compat.engine_core_pids(self._client)
        state = State()
        await compat.init_app_state(self._client, state, ns)
        self._routes = openai_layer.routes(state)
        self._models = state.openai_serving_models
        model_config = self._client.model_config
        self._accepts_images = bool(model_config.is_multimodal_model)
        self._info = ModelInfo(max_model_len=int(model_config.max_model_len))

    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("the engine has not been started")
        return self._info

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load the adapter into the engine core (vLLM's `add_lora`, as its runtime loading does)
        and name it in this frontend's OpenAI layer. The id is the replica's, so that every
        frontend of one engine core names the same weights by it."""
        from vllm.lora.request import LoRARequest

        if self.config.lora_options is None:
            raise AdapterError(
                400, f"model '{self.config.id}' serves no LoRA adapters (no `lora` in its config)"
            )
        request = LoRARequest(lora_name=adapter.name, lora_int_id=adapter.lora_id, lora_path=adapter.path)
        try:
            await self._client.add_lora(request)
        except Exception as exc:  # vLLM's reason: files, rank, target modules...
            raise AdapterError(400, f"vLLM could not load the adapter: {exc}") from None
        for name in adapter.names:  # an alias names the same request (answers say its name)
            self._models.lora_requests[name] = request

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Unname the adapter (unless a later load took its name) and drop it from the engine
        core; a request in flight keeps its weights (vLLM reloads them for it)."""
        for name in adapter.names:
            current = self._models.lora_requests.get(name)
            if current is not None and current.lora_int_id == adapter.lora_id:
                del self._models.lora_requests[name]
        await self._client.remove_lora(adapter.lora_id)

    async def handle(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes | Usage]:
        entry = self._routes.get(route)
        if entry is None:
            yield Head(404, error_body(404, f"model '{self.config.id}' does not serve the {route.value} API"))
            return
        serving, parse, create = entry
        parsed = await self._parse(route, body, serving, parse)
        if isinstance(parsed, Head):
            yield parsed
            return
        request, hide_usage = parsed
        request_id = self._own_id(request_id)
        if hasattr(request, "request_id"):
            request.request_id = request_id
        # The parsers vLLM makes for this request are freed when it ends.
        with json_coroutines.per_request(), self._holding(request_id):
            try:
                result = await create(request, None)
            except Exception as exc:  # vLLM maps its exceptions to OpenAI errors itself
                result = serving.create_error_response(exc)
            if isinstance(result, BaseModel):
                yield openai_layer.whole_response(result)
                return
            yield Head(200, stream=True)
            usage = None
            try:
                async for chunk in result:
                    if (counted := openai_layer.usage_of(chunk)) is not None:
                        usage = counted
                        if hide_usage:
                            continue
                    yield chunk.encode()
            finally:
                await result.aclose()
            if usage is not None:
                yield usage

    async def _parse(
        self, route: Route, body: bytes, serving: Any, parse: Callable[[Any], Any]
    ) -> tuple[Any, bool] | Head:
        """vLLM's request model of `body` and whether to hide the usage chunk we ask for; or the
        error answer. Bounds are checked once vLLM's request model has accepted the body (so a
        request vLLM refuses gets vLLM's own error, as from `vllm serve`), on what it parsed."""
        try:
            payload = json.loads(body)
            if route in (Route.CHAT, Route.TOKENIZE) and isinstance(payload, dict):
                check_media(
                    payload.get("messages"),
                    model_id=self.config.id,
                    accepts_images=self._accepts_images,
                    allowed_hosts=self.config.media.allowed_remote_hosts,
                    max_image_pixels=self.limits.max_image_pixels,
                )
            generates = route in (Route.CHAT, Route.COMPLETION)
            hide_usage = generates and openai_layer.count_usage(payload)
            request = parse(payload)
            check_request(route.value, payload, self.limits, self.info().max_model_len, parsed=request)
            return request, hide_usage
        except ValidationError as exc:
            return await openai_layer.validation_error(exc, self._namespace)
        except InputError as exc:
            return Head(exc.status, exc.body())
        except MediaError as exc:
            return Head(400, error_body(400, str(exc), param="messages"))
        except Exception as exc:  # e.g. VLLMValidationError from a request model's validator
            return openai_layer.whole_response(serving.create_error_response(exc))

    def _own_id(self, request_id: str) -> str:
        """`request_id`, or a variant of it while another request runs under it: vLLM aborts by
        the id a request came with, so a client that leaves would end the other's request too."""
        return request_id if request_id not in self._request_ids else f"{request_id}-{uuid.uuid4().hex[:8]}"

    @contextlib.contextmanager
    def _holding(self, request_id: str) -> Iterator[None]:
        self._request_ids.add(request_id)
        try:
            yield
        finally:
            self._request_ids.discard(request_id)

    def load(self) -> Load:
        """This client's view of the engine's load."""
        if self._client is None:
            return Load(0, 0, 0, 0.0, time.monotonic())
        snapshot = self._scheduler
        return Load(
            in_flight=int(self._client.output_processor.get_num_unfinished_requests()),
            running=snapshot.running,
            waiting=snapshot.waiting,
            kv_cache_usage=snapshot.kv_cache_usage,
            last_step=snapshot.last_step,
            prefix_cache_queries=snapshot.prefix_cache_queries,
            prefix_cache_hits=snapshot.prefix_cache_hits,
        )

    def stats(self) -> EngineStats:
        load = self.load()
        return load.stats(load.in_flight)

    async def check_health(self) -> None:
        """Fail if the engine died, is stuck, or cannot generate a token.

        A dead engine core fails vLLM's own check. A busy engine must have made a step
        within STALL_S; an idle one must generate one token within PROBE_TIMEOUT_S.
        """
        await self.check_alive()
        if self.asleep:
            return  # a parked engine generates nothing until woken
        load = self.load()
        if self._stall.needs_probe(load.in_flight > 0, load.last_step):
            await self._sleep.probe(self.probe)

    async def check_alive(self) -> None:
        """vLLM's own check: it raises once the engine core process is gone."""
        if self._client is None:
            raise RuntimeError("the engine has not been started")
        await self._client.check_health()

    async def probe(self) -> None:
        """Generate one token from a one-token prompt within PROBE_TIMEOUT_S: the engine works."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        request_id = f"health-probe-{uuid.uuid4().hex}"

        async def generate() -> None:
            async for _ in self._client.generate({"prompt_token_ids": [1]}, params, request_id):
                pass

        try:
            await asyncio.wait_for(generate(), timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"the engine generated no token in {PROBE_TIMEOUT_S:.0f} s") from None

    def dead(self) -> bool:
        """Whether the engine died. vLLM marks its client errored only once its monitor thread
        has seen the engine core go and shut the client down; a request that arrives between
        would be taken by a dead engine, so the engine core processes are looked at too."""
        if self._client is None:
            return False
        return bool(self._client.errored) or not all(map(alive, self._core_pids))

    @property
    def core_pids(self) -> list[int]:
        """The engine core processes this engine started (none for one frontend of several)."""
        return list(self._core_pids)

    async def shutdown(self) -> None:
        await self._stack.aclose()
        self._client = None
