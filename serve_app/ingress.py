"""The OpenAI-compatible ingress: one FastAPI app in front of every model deployment.

The ingress reads only what it needs to route (`model`), and forwards the raw body to the
model's deployment, which validates it with vLLM's own request models. Streams pass
through chunk by chunk as the engine produces them: nothing is held back or re-encoded.
Handles are created once, in the constructor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from serve_app.auth import KeyChecker, check_exposure
from serve_app.config import AuthOptions, ObservabilityOptions, QuotaOptions, RequestLimits
from serve_app.engine.protocol import Head, Route, Usage
from serve_app.errors import error_body
from serve_app.limits import InputError, check_body_size, check_headers, decode_body
from serve_app.quotas import Quotas, Rejection
from serve_app.streams import coalesce
from serve_app.telemetry import RequestRecord, Telemetry

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
_JSON = "application/json"
RETRY_AFTER_S = 10


@dataclass(frozen=True)
class ModelCard:
    """What `/v1/models` says about one model; one card per deployment."""

    id: str
    aliases: tuple[str, ...]
    deployment: str
    owned_by: str
    max_model_len: int | None = None
    wait_timeout_s: float = 300.0  # how long a request may wait for a replica to take it
    priority_scheduling: bool = False  # the engine schedules by request priority

    def to_openai(self, name: str, created: int, max_model_len: int | None) -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": self.owned_by,
            "root": self.id,
            "aliases": [n for n in (self.id, *self.aliases) if n != name],
        }
        if max_model_len is not None:
            card["max_model_len"] = max_model_len
        return card


def _error(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    body = error_body(status, message, param=param)
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


class OpenAIIngress:
    """Routes OpenAI requests to model deployments by the request's `model`."""

    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        cards: list[ModelCard],
        auth: AuthOptions | None = None,
        observability: ObservabilityOptions | None = None,
        quotas: QuotaOptions | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self._limits = limits or RequestLimits()
        auth = auth or AuthOptions()
        self._quotas = Quotas(quotas or QuotaOptions())  # this replica's share (see the builder)
        observability = observability or ObservabilityOptions()
        self._keys = KeyChecker.from_options(auth)
        self._telemetry = Telemetry(
            [c.id for c in cards],
            access_log=observability.access_log,
            log_request_text=observability.log_request_text,
        )
        host = _serve_http_host()
        if host is not None:
            check_exposure(host, auth, "ingress")
        self._created = int(time.time())
        self._cards = cards
        self._handles = models
        # `.options()` builds a new handle: do it once here, not per request.
        self._streams = {name: _stream_handle(handle) for name, handle in models.items()}
        self._deployment_of = {name: c.deployment for c in cards for name in (c.id, *c.aliases)}
        self._model_id = {name: c.id for c in cards for name in (c.id, *c.aliases)}
        self._priority_scheduling = {c.deployment for c in cards if c.priority_scheduling}
        self._wait_timeout_s = {c.deployment: c.wait_timeout_s for c in cards}
        # Like `vllm serve`, a server of one model lets requests leave `model` out.
        self._only_model = cards[0].id if len(cards) == 1 else None
        self._max_model_len: dict[str, int] = {
            c.deployment: c.max_model_len for c in cards if c.max_model_len is not None
        }

    def _finish(self, record: RequestRecord) -> None:
        """A request ended (answered, failed or cancelled): free its quota and record it."""
        if record.admission is not None:
            usage = record.usage
            self._quotas.release(
                record.admission, usage.prompt_tokens + usage.completion_tokens if usage else 0
            )
        self._telemetry.finish(record)

    def _denied(self, request: Request, record: RequestRecord | None = None) -> Response | None:
        identity = self._keys.identify(request.headers.get("authorization"))
        if identity is not None:
            if record is not None:
                record.identity = identity
            return None
        return _error(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.")

    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, Route.CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._forward(request, Route.COMPLETION)

    async def tokenize(self, request: Request) -> Response:
        return await self._forward(request, Route.TOKENIZE)

    async def detokenize(self, request: Request) -> Response:
        return await self._forward(request, Route.DETOKENIZE)

    async def _measured(self, record: RequestRecord, answer: Awaitable[Response]) -> Response:
        """Await the answer to a request and record it (a stream records itself when it ends)."""
        try:
            response = await answer
        except asyncio.CancelledError:  # the client went away
            record.cancelled = True
            self._finish(record)
            raise
        except Exception as exc:
            record.status, record.error = 500, repr(exc)
            self._finish(record)
            raise
        if not isinstance(response, _RelayedStream):
            record.status, record.done = response.status_code, True
            self._finish(record)
        return response

    async def list_models(self, request: Request) -> Response:
        record = self._telemetry.begin(_request_id(request), "models")
        return await self._measured(record, self._list_models(request))

    async def _list_models(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        data = [await self._card(name) for name in self._deployment_of]
        return Response(json.dumps({"object": "list", "data": data}), media_type=_JSON)

    async def get_model(self, model_id: str, request: Request) -> Response:
        record = self._telemetry.begin(_request_id(request), "models")
        return await self._measured(record, self._get_model(model_id, request, record))

    async def _get_model(self, model_id: str, request: Request, record: RequestRecord) -> Response:
        if denied := self._denied(request):
            return denied
        if model_id not in self._deployment_of:
            return _error(404, f"The model `{model_id}` does not exist.", param="model")
        record.model = self._model_id[model_id]
        return Response(json.dumps(await self._card(model_id)), media_type=_JSON)

    async def health(self) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    async def _card(self, name: str) -> dict[str, Any]:
        deployment = self._deployment_of[name]
        card = next(c for c in self._cards if c.deployment == deployment)
        if deployment not in self._max_model_len:
            # Not in the config: ask a replica once (the answer never changes). A model at zero
            # replicas would be woken by the question, so it is dropped again after 2 s.
            response = self._handles[deployment].model_info.remote()
            try:
                info = await asyncio.wait_for(response, timeout=2.0)
                self._max_model_len[deployment] = info.max_model_len
            except Exception:  # no replica ready yet: list the model without it
                response.cancel()
        return card.to_openai(name, self._created, self._max_model_len.get(deployment))

    async def _forward(self, request: Request, route: Route) -> Response:
        record = self._telemetry.begin(_request_id(request), route.value)
        return await self._measured(record, self._route(request, route, record))

    async def _route(self, request: Request, route: Route, record: RequestRecord) -> Response:
        if denied := self._denied(request, record):
            return denied
        request_id = record.request_id
        limits = self._limits
        try:
            check_headers(request.headers.items(), limits)
            declared = request.headers.get("content-length")
            if declared and declared.isdigit():
                check_body_size(int(declared), limits)  # before reading it
            body = await request.body()
            check_body_size(len(body), limits)
            payload = decode_body(body)
        except InputError as exc:
            return Response(exc.body(), status_code=exc.status, media_type=_JSON)
        if not isinstance(payload, dict):
            return _error(400, "The request body must be a JSON object.")
        model = payload.get("model", self._only_model)
        if not isinstance(model, str) or not model:
            return _error(400, "`model` is required and must be a string.", param="model")
        deployment = self._deployment_of.get(model)
        if deployment is None:
            return _error(404, f"The model `{model}` does not exist.", param="model")
        model_id = self._model_id[model]
        if self._quotas.enabled:
            admission = self._quotas.admit(record.identity, model_id)
            if isinstance(admission, Rejection):
                record.error = "quota"
                return _error(429, admission.message, headers={"Retry-After": str(admission.retry_after_s)})
            record.admission = admission
            if admission.priority is not None and deployment in self._priority_scheduling:
                payload["priority"] = admission.priority  # the key's, not the client's
                body = json.dumps(payload).encode()
        self._telemetry.routed(record, model_id, body)
        record.stream = payload.get("stream") is True

        deadline = time.monotonic() + self._wait_timeout_s[deployment]
        for attempt in (1, 2):
            stream = self._streams[deployment].remote(route, body, request_id)
            try:
                # The request waits here (not failed) while the model has no free replica, e.g.
                # while it scales up from zero; the wait is bounded per model.
                await asyncio.wait_for(stream.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
                record.accepted = time.perf_counter()
                head = await stream.__anext__()
                break
            except asyncio.TimeoutError:
                stream.cancel()
                logger.warning("request %s: no replica of %s took it in time", request_id, model)
                return _error(
                    503,
                    f"The model `{model}` has no replica ready to serve the request; retry later.",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            except BackPressureError:
                # The model's router queue is full (deployment.max_queued_requests): shed load.
                record.error = "backpressure"
                return _error(
                    503,
                    f"The model `{model}` is at capacity; retry later.",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            except asyncio.CancelledError:
                stream.cancel()  # the client went away: free the engine
                raise
            except Exception as exc:
                # The replica or its engine failed before the first byte: nothing reached
                # the client, so the request is tried once more (on another replica).
                stream.cancel()
                record.error = repr(exc)
                if attempt == 1:
                    logger.warning(
                        "request %s: model %s failed before responding (%r); retrying", request_id, model, exc
                    )
                    continue
                logger.warning(
                    "request %s: model %s failed again before responding: %r", request_id, model, exc
                )
                return _error(503, f"The model `{model}` could not serve the request; retry later.")
        assert isinstance(head, Head)
        if not head.stream:
            record.usage = head.usage
            if record.response_text is not None:
                record.response_text.append(head.body)
            return Response(head.body, status_code=head.status, media_type=_JSON)
        record.status = 200
        return _RelayedStream(stream, record, self._finish)


class _RelayedStream(StreamingResponse):
    """An SSE response relayed from a model replica, recorded when it ends.

    However the response ends (sent whole, broken, or the client gone before or during
    the body), the engine request is released and the request is recorded once.
    """

    def __init__(
        self,
        stream: DeploymentResponseGenerator,
        record: RequestRecord,
        on_finish: Callable[[RequestRecord], None],
    ) -> None:
        super().__init__(_relay(stream, record), media_type="text/event-stream")
        self._stream = stream
        self._record = record
        self._on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TaskCancelledError:
            # Serve reports a client that left as a cancelled task from `receive()`: that is
            # the end of this response (recorded as cancelled below), not an error.
            pass
        finally:
            if not self._record.done:
                self._record.cancelled = True
                self._stream.cancel()
            self._on_finish(self._record)


async def _relay(stream: DeploymentResponseGenerator, record: RequestRecord) -> AsyncIterator[bytes]:
    """Pass SSE chunks on as they come, keeping the engine's token counts for the record.

    Chunks that queue while this replica is busy go on together (`coalesce`): the HTTP side
    then sends fewer, larger messages, and the first chunk is never held back.
    """
    finished = False
    try:
        async with contextlib.aclosing(coalesce(stream)) as items:
            async for item in items:
                if isinstance(item, Usage):
                    record.usage = item
                    continue
                record.chunk(item)
                finished = item.endswith(b"data: [DONE]\n\n")
                yield item
    except Exception as exc:  # the replica died mid-stream: end the way OpenAI clients understand
        logger.warning("request %s: stream broke: %r", record.request_id, exc)
        record.status, record.error = 503, f"stream interrupted: {exc!r}"
        yield b"data: " + error_body(503, "The stream was interrupted by a server error.") + b"\n\n"
        yield b"data: [DONE]\n\n"
        finished = True
    # A stream cut short (Serve cancels the model's stream when the client leaves) ends
    # without [DONE]: it stays not done, so it is recorded as cancelled.
    record.done = finished


def _request_id(request: Request) -> str:
    # Ray Serve's proxy keeps a client's X-Request-Id (or makes one), passes it in the
    # request headers and returns it on the response; it becomes the engine's request id.
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


def _openai_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _error(400, str(exc.errors()[:3]))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in the ingress")
        return _error(500, "Internal server error.")


ROUTES: list[tuple[str, str, str]] = [
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/completions", "completions"),
    ("POST", "/tokenize", "tokenize"),
    ("POST", "/detokenize", "detokenize"),
    ("GET", "/v1/models", "list_models"),
    ("GET", "/v1/models/{model_id:path}", "get_model"),
    ("GET", "/health", "health"),
]


def _stream_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """The handle that streams `generate` from a model deployment.

    Chunks travel over Serve's direct gRPC transport between replicas rather than as Ray
    objects (`_by_reference=False`): measured on 2 CPU cores with the demo model, 516
    against 469 output tokens/s at 64 streams. They are pickled, not cloudpickled: every
    item is bytes or one of our small dataclasses. Ray releases without the option stream by
    reference.
    """
    try:
        return handle.options(
            method_name="generate",
            stream=True,
            _by_reference=False,
            request_serialization="pickle",
            response_serialization="pickle",
        )
    except TypeError:
        return handle.options(method_name="generate", stream=True)


def _serve_http_host() -> str | None:
    """The host Serve's HTTP proxies listen on, asked from the Serve controller.

    Ray Serve has no public API for it; this reads the controller's HTTP options and gives
    None (no check) if that ever changes.
    """
    try:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return str(ray.get(controller.get_http_config.remote(), timeout=10).host)
    except Exception as exc:
        logger.warning("cannot read Serve's HTTP host (%r): exposure check skipped", exc)
        return None


def make_ingress(cls: type[OpenAIIngress] = OpenAIIngress, cors_allow_origins: tuple[str, ...] = ()) -> type:
    """Attach the OpenAI routes to `cls` and wrap it as a Serve ingress class."""
    app = FastAPI(title="mistral-serve", docs_url=None, redoc_url=None, openapi_url=None)
    _openai_error_handlers(app)
    if cors_allow_origins:
        # Closed unless configured; never credentials, only what the API needs.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            allow_credentials=False,
        )
    for method, path, attr in ROUTES:
        app.api_route(path, methods=[method])(getattr(cls, attr))
    return serve.ingress(app)(cls)
