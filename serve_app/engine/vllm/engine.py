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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import psutil
from pydantic import BaseModel, ValidationError
from starlette.datastructures import State

from serve_app.config import ModelConfig
from serve_app.engine.protocol import Engine, EngineStats, Head, ModelInfo, Route, Usage
from serve_app.engine.vllm import compat, openai_layer
from serve_app.engine.vllm.args import build_namespace, check_source, engine_args, validate_engine_args
from serve_app.engine.vllm.patches import apply_all, json_coroutines
from serve_app.engine.vllm.stats import SchedulerSnapshot, ray_stat_logger
from serve_app.errors import error_body
from serve_app.guards.limits import InputError, check_request
from serve_app.guards.media import MediaError, check_media

logger = logging.getLogger(__name__)

STALL_S = 60.0  # a busy engine that makes no step for this long is stuck
PROBE_TIMEOUT_S = 20.0  # an idle engine must generate one token within this


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.asynccontextmanager
async def _engine_client(args: Any, stat_loggers: list[Any]) -> AsyncIterator[Any]:
    """vLLM's `AsyncLLM`, built as `vllm serve` builds it, with our stat loggers added."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    client = AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=stat_loggers,
        **compat.async_llm_options(args),
    )
    try:
        await client.reset_mm_cache()  # don't keep the profiling inputs in memory
        yield client
    finally:
        client.shutdown(timeout=compat.shutdown_timeout(vllm_config))


class VLLMEngine(Engine):
    """vLLM's `AsyncLLM` with vLLM's OpenAI serving layer on top."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._routes: openai_layer.Routes = {}
        self._scheduler = SchedulerSnapshot()
        self._busy_since: float | None = None
        self._info: ModelInfo | None = None
        self._accepts_images = False
        self._namespace = Namespace()
        self._request_ids: set[str] = set()  # the ids of the requests running now
        self._core_pids: list[int] = []

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        validate_engine_args(config)

    async def start(self) -> None:
        check_source(self.config)
        ns = self._namespace = build_namespace(self.config)
        apply_all()
        # vLLM 0.32 bounds the pixels of every image it decodes, those it fetches from an
        # allowed host included (0.24 leaves them to Pillow's decompression-bomb check): the
        # same bound as serve_app.guards.media's for data: URLs.
        os.environ["VLLM_MAX_IMAGE_PIXELS"] = str(self.limits.max_image_pixels)
        # vLLM's own metrics go to Ray's metrics endpoint when the engine runs under Ray.
        loggers = [self._scheduler.factory]
        if (ray_logger := ray_stat_logger()) is not None:
            loggers.insert(0, ray_logger)
        self._client = await self._stack.enter_async_context(_engine_client(engine_args(ns), loggers))
        self._core_pids = compat.engine_core_pids(self._client)
        state = State()
        await compat.init_app_state(self._client, state, ns)
        self._routes = openai_layer.routes(state)
        model_config = self._client.model_config
        self._accepts_images = bool(model_config.is_multimodal_model)
        self._info = ModelInfo(max_model_len=int(model_config.max_model_len))

    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("the engine has not been started")
        return self._info

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

    def stats(self) -> EngineStats:
        if self._client is None:
            return EngineStats(in_flight=0)
        # The scheduler's figures are those of its last step; the output processor knows at
        # once when a request finished or was aborted, so it bounds them (an idle engine
        # takes no step to report zero).
        in_flight = int(self._client.output_processor.get_num_unfinished_requests())
        running = min(self._scheduler.running, in_flight)
        return EngineStats(
            in_flight=in_flight,
            running=running,
            waiting=min(self._scheduler.waiting, in_flight - running),
            kv_cache_usage=self._scheduler.kv_cache_usage if in_flight else 0.0,
        )

    async def check_health(self) -> None:
        """Fail if the engine died, is stuck, or cannot generate a token.

        A dead engine core fails vLLM's own check. A busy engine must have made a step
        within STALL_S; an idle one must generate one token within PROBE_TIMEOUT_S.
        """
        if self._client is None:
            raise RuntimeError("the engine has not been started")
        await self._client.check_health()  # raises once the engine core process is gone
        now = time.monotonic()
        if self._client.output_processor.get_num_unfinished_requests():
            self._busy_since = self._busy_since or now
            stalled = now - max(self._scheduler.last_step, self._busy_since)
            if stalled > STALL_S:
                raise RuntimeError(f"the engine has requests but made no step for {stalled:.0f} s")
            return
        self._busy_since = None
        try:
            await asyncio.wait_for(self._probe(), timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"the engine generated no token in {PROBE_TIMEOUT_S:.0f} s") from None

    async def _probe(self) -> None:
        """Generate one token from a one-token prompt: the engine really works."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
        request_id = f"health-probe-{uuid.uuid4().hex}"
        async for _ in self._client.generate({"prompt_token_ids": [1]}, params, request_id):
            pass

    def dead(self) -> bool:
        """Whether the engine died. vLLM marks its client errored only once its monitor thread
        has seen the engine core go and shut the client down; a request that arrives between
        would be taken by a dead engine, so the engine core processes are looked at too."""
        if self._client is None:
            return False
        return bool(self._client.errored) or not all(map(_alive, self._core_pids))

    async def shutdown(self) -> None:
        await self._stack.aclose()
        self._client = None
