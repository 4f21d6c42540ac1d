"""The OpenAI-compatible ingress: one FastAPI app in front of every model deployment.

The ingress reads only what it needs to route (`model`), and forwards the raw body to the
model's deployment, which validates it with vLLM's own request models. Streams pass
through chunk by chunk as the engine produces them: nothing is held back or re-encoded.
Handles are created once, in the constructor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from serve_app.auth import KeyChecker, check_exposure
from serve_app.config import AuthOptions, ObservabilityOptions
from serve_app.engine.protocol import Head, Route, Usage
from serve_app.errors import error_body
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
    ) -> None:
        auth = auth or AuthOptions()
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
        self._streams = {
            name: handle.options(method_name="generate", stream=True) for name, handle in models.items()
        }
        self._deployment_of = {name: c.deployment for c in cards for name in (c.id, *c.aliases)}
        self._model_id = {name: c.id for c in cards for name in (c.id, *c.aliases)}
        self._wait_timeout_s = {c.deployment: c.wait_timeout_s for c in cards}
        # Like `vllm serve`, a server of one model lets requests leave `model` out.
        self._only_model = cards[0].id if len(cards) == 1 else None
        self._max_model_len: dict[str, int] = {
            c.deployment: c.max_model_len for c in cards if c.max_model_len is not None
        }

    def _denied(self, request: Request) -> Response | None:
        if self._keys.allows(request.headers.get("authorization")):
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
            self._telemetry.finish(record)
            raise
        except Exception as exc:
            record.status, record.error = 500, repr(exc)
            self._telemetry.finish(record)
            raise
        if not isinstance(response, _RelayedStream):
            record.status, record.done = response.status_code, True
            self._telemetry.finish(record)
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
        if denied := self._denied(request):
            return denied
        request_id = record.request_id
        body = await request.body()
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"The request body is not valid JSON: {exc}")
        if not isinstance(payload, dict):
            return _error(400, "The request body must be a JSON object.")
        model = payload.get("model", self._only_model)
        if not isinstance(model, str) or not model:
            return _error(400, "`model` is required and must be a string.", param="model")
        deployment = self._deployment_of.get(model)
        if deployment is None:
            return _error(404, f"The model `{model}` does not exist.", param="model")
        self._telemetry.routed(record, self._model_id[model], body)
        record.stream = payload.get("stream") is True

        stream = self._streams[deployment].remote(route, body, request_id)
        try:
            # The request waits here (not failed) while the model has no free replica, e.g.
            # while it scales up from zero; the wait is bounded per model.
            await asyncio.wait_for(stream.__anext__(), timeout=self._wait_timeout_s[deployment])
            record.accepted = time.perf_counter()
            head = await stream.__anext__()
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
            stream.cancel()
            logger.warning("request %s: model %s failed before responding: %r", request_id, model, exc)
            record.error = repr(exc)
            return _error(503, f"The model `{model}` could not serve the request; retry later.")
        assert isinstance(head, Head)
        if not head.stream:
            record.usage = head.usage
            if record.response_text is not None:
                record.response_text.append(head.body)
            return Response(head.body, status_code=head.status, media_type=_JSON)
        record.status = 200
        return _RelayedStream(stream, record, self._telemetry)


class _RelayedStream(StreamingResponse):
    """An SSE response relayed from a model replica, recorded when it ends.

    However the response ends (sent whole, broken, or the client gone before or during
    the body), the engine request is released and the request is recorded once.
    """

    def __init__(
        self, stream: DeploymentResponseGenerator, record: RequestRecord, telemetry: Telemetry
    ) -> None:
        super().__init__(_relay(stream, record), media_type="text/event-stream")
        self._stream = stream
        self._record = record
        self._telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._record.done:
                self._record.cancelled = True
                self._stream.cancel()
            self._telemetry.finish(self._record)


async def _relay(stream: DeploymentResponseGenerator, record: RequestRecord) -> AsyncIterator[bytes]:
    """Pass SSE chunks through as they come; keep the engine's token counts for the record."""
    try:
        async for item in stream:
            if isinstance(item, Usage):
                record.usage = item
                continue
            record.chunk(item)
            yield item
    except Exception as exc:
        # The replica died mid-stream: end the stream the way OpenAI clients understand.
        logger.warning("request %s: stream broke: %r", record.request_id, exc)
        record.status, record.error = 503, f"stream interrupted: {exc!r}"
        yield b"data: " + error_body(503, "The stream was interrupted by a server error.") + b"\n\n"
        yield b"data: [DONE]\n\n"
    record.done = True


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
