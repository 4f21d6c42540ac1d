"""The OpenAI-compatible ingress: one FastAPI app in front of every model deployment.

The ingress reads only what it needs to route (`model`), and forwards the raw body to the
model's deployment, which validates it with vLLM's own request models. Streams pass
through chunk by chunk as the engine produces them: nothing is held back or re-encoded.

A request to a model goes through, in order: its id, the caller's key, what a web page could
send a keyless app and the key's quota (`admission`), the body's bounds (`payload`), the model
it names (`catalog`) and the key's quota on it, what the key decides in the body (`admission`),
the send to a replica with its wait bound and one retry (`dispatch`), then the answer, whole
or relayed (`relay`). Each step refuses with an `ApiError`, answered here in OpenAI's shape.

The Batch API's routes (`/v1/files`, `/v1/batches`) are answered by the batch service
(serve_app.serving.batches); it sends each request of a batch back here (`batch_line`), where
it takes the same steps from the key's quota on, as the key that created the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.config import AuthOptions, BatchOptions, ObservabilityOptions, QuotaOptions, RequestLimits
from serve_app.engine.protocol import Head, Route
from serve_app.errors import ApiError, error_body
from serve_app.guards.auth import check_exposure
from serve_app.serving.adapters import AdapterSpec
from serve_app.serving.admin import AdapterAdmin
from serve_app.serving.admission import Gate
from serve_app.serving.batches.api import BatchApi, query_limit, query_text
from serve_app.serving.batches.format import LineAnswer
from serve_app.serving.catalog import Catalog, ModelCard, ServedModel
from serve_app.serving.dispatch import dispatch
from serve_app.serving.lanes import Lanes
from serve_app.serving.payload import parse_payload, read_payload
from serve_app.serving.relay import RelayedStream
from serve_app.serving.routing import affinity_of
from serve_app.serving.telemetry import RequestRecord, Telemetry

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

REQUEST_ID_HEADER = "x-request-id"
_JSON = "application/json"


def error_response(error: ApiError) -> Response:
    """The HTTP answer of an `ApiError`: its OpenAI body, its status and headers."""
    return Response(error.body(), status_code=error.status, media_type=_JSON, headers=error.headers)


class OpenAIIngress:
    """Routes OpenAI requests to model deployments by the request's `model`."""

    def __init__(
        self,
        models: Mapping[str, DeploymentHandle],
        cards: Sequence[ModelCard],
        auth: AuthOptions | None = None,
        observability: ObservabilityOptions | None = None,
        quotas: QuotaOptions | None = None,
        limits: RequestLimits | None = None,
        adapter_registry: DeploymentHandle | None = None,
        batches: DeploymentHandle | None = None,
        batch_options: BatchOptions | None = None,
    ) -> None:
        """`adapter_registry`: the book of adapters added at run time, where the admin routes
        are on (serve_app.serving.adapter_registry); `batches`: the batch service, where the
        Batch API is on (serve_app.serving.batches)."""
        auth = auth or AuthOptions()
        observability = observability or ObservabilityOptions()
        if (host := _serve_http_host()) is not None:
            check_exposure(host, auth, "ingress")
        self._limits = limits or RequestLimits()
        self._gate = Gate(auth, quotas or QuotaOptions())
        self._catalog = Catalog(cards, models)
        self._admin = AdapterAdmin(auth.admin, adapter_registry, self._catalog)
        batch_options = batch_options or BatchOptions()
        self._batches = BatchApi(batches, batch_options)
        self._batch_priority = batch_options.priority
        self._lanes = Lanes(
            per_model=batch_options.yield_to == "model",
            settle_s=batch_options.settle_s,
            preempt=batch_options.preempt,
        )
        self._hold_to_first_token = batch_options.yield_until == "first_token"
        self._telemetry = Telemetry(
            [c.id for c in cards],
            access_log=observability.access_log,
            log_request_text=observability.log_request_text,
        )
        self._created = int(time.time())

    # --- routes -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, Route.CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._forward(request, Route.COMPLETION)

    async def tokenize(self, request: Request) -> Response:
        return await self._forward(request, Route.TOKENIZE)

    async def detokenize(self, request: Request) -> Response:
        return await self._forward(request, Route.DETOKENIZE)

    async def list_models(self, request: Request) -> Response:
        record = self._telemetry.begin(_request_id(request), "models")
        return await self._measured(record, self._list_models(request))

    async def get_model(self, model_id: str, request: Request) -> Response:
        record = self._telemetry.begin(_request_id(request), "models")
        return await self._measured(record, self._get_model(model_id, request, record))

    async def load_lora_adapter(self, request: Request) -> Response:
        return await self._admin_call(request, self._admin.load)

    async def unload_lora_adapter(self, request: Request) -> Response:
        return await self._admin_call(request, self._admin.unload)

    # The Batch API (serve_app.serving.batches): a key's own files and batches.

    async def files_create(self, request: Request) -> Response:
        return await self._batch_call(
            request, "files", lambda owner: self._batches.upload(request, owner), upload=True
        )

    async def files_list(self, request: Request) -> Response:
        def listed(owner: str) -> Awaitable[Any]:
            purpose, after = query_text(request, "purpose"), query_text(request, "after")
            return self._batches.call("list_files", owner, purpose, query_limit(request, 100), after)

        return await self._batch_call(request, "files", listed)

    async def file_get(self, file_id: str, request: Request) -> Response:
        return await self._batch_call(
            request, "files", lambda owner: self._batches.call("get_file", owner, file_id)
        )

    async def file_delete(self, file_id: str, request: Request) -> Response:
        return await self._batch_call(
            request, "files", lambda owner: self._batches.call("delete_file", owner, file_id)
        )

    async def file_content(self, file_id: str, request: Request) -> Response:
        return await self._batch_call(
            request, "files", lambda owner: self._batches.call("file_content", owner, file_id)
        )

    async def batches_create(self, request: Request) -> Response:
        async def create(owner: str) -> Any:
            _, payload = await read_payload(request, self._limits)
            served = list(self._catalog.names())
            return await self._batches.create_batch(payload, owner, served)

        return await self._batch_call(request, "batches", create, has_body=True)

    async def batches_list(self, request: Request) -> Response:
        def listed(owner: str) -> Awaitable[Any]:
            after = query_text(request, "after")
            return self._batches.call("list_batches", owner, query_limit(request, 20), after)

        return await self._batch_call(request, "batches", listed)

    async def batch_get(self, batch_id: str, request: Request) -> Response:
        return await self._batch_call(
            request, "batches", lambda owner: self._batches.call("get_batch", owner, batch_id)
        )

    async def batch_cancel(self, batch_id: str, request: Request) -> Response:
        return await self._batch_call(
            request, "batches", lambda owner: self._batches.call("cancel_batch", owner, batch_id)
        )

    async def batch_line(self, owner: str, route: Route, body: bytes, request_id: str) -> LineAnswer:
        """Serve one request of a batch of `owner`'s (a key's hash), for the batch service: the
        same checks as an HTTP request's from the key on, at the batch's priority; the answer
        whole (a batch request cannot stream)."""
        record = self._telemetry.begin(request_id, f"batch_{route.value}")
        record.identity = owner

        async def serve() -> LineAnswer:
            try:
                if not self._gate.knows(owner):
                    raise ApiError(401, "The API key that created this batch is no longer accepted.")
                record.admission = self._gate.admit(owner)
                payload = parse_payload(body, self._limits)
                if payload.get("stream") is True:
                    raise ApiError(400, "A batch request cannot stream.", param="stream")
                head, stream = await self._send(route, body, payload, record, {}, batch=True)
            except ApiError as error:
                record.status = error.status
                return LineAnswer(error.status, error.body(), request_id)
            if head.stream:  # the engine streams only what asks to: never here
                stream.cancel()
                raise RuntimeError("a batch request was answered as a stream")
            record.usage = head.usage
            record.status = head.status
            usage = head.usage
            return LineAnswer(
                head.status,
                head.body,
                request_id,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
            )

        try:
            return await serve()
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        except Exception as exc:
            record.status, record.error = 500, repr(exc)
            raise
        finally:
            record.done = not record.cancelled
            self._finish(record)

    async def health(self) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    # --- the steps ----------------------------------------------------------------------

    async def _forward(self, request: Request, route: Route) -> Response:
        record = self._telemetry.begin(_request_id(request), route.value)
        return await self._measured(record, self._route(request, route, record))

    async def _route(self, request: Request, route: Route, record: RequestRecord) -> Response:
        """Serve one request to a model: each step answers the client with an ApiError if it refuses."""
        try:
            check_request_id(request)
            record.identity = self._gate.identify(request)
            self._gate.check_origin(request, has_body=True)
            record.admission = self._gate.admit(record.identity)
            body, payload = await read_payload(request, self._limits)
            head, stream = await self._send(route, body, payload, record, request.headers)
        except ApiError as error:
            if error.status == 429:
                record.error = "quota"
            return error_response(error)
        if not head.stream:
            record.usage = head.usage
            if record.response_text is not None:
                record.response_text.append(head.body)
            return Response(head.body, status_code=head.status, media_type=_JSON)
        record.status = 200
        return RelayedStream(stream, record, self._finish)

    async def _send(
        self,
        route: Route,
        body: bytes,
        payload: dict[str, Any],
        record: RequestRecord,
        headers: Mapping[str, str],
        *,
        batch: bool = False,
    ) -> tuple[Head, DeploymentResponseGenerator]:
        """From a request's parsed body to its model's answer: the model it names, the key's
        quota on it, what the key decides in the body, the send (ApiError if one refuses)."""
        record.body_bytes = len(body)
        name, model, adapter = await self._resolve(payload)
        record.adapter = adapter.name if adapter is not None else ""
        self._gate.admit_to_model(
            record.admission, model.card.id, payload, adapter.name if adapter is not None else None
        )
        body = self._gate.rewrite(
            body,
            payload,
            record.identity,
            record.admission,
            generates=route in (Route.CHAT, Route.COMPLETION),
            priority_scheduling=model.card.priority_scheduling,
            batch_priority=self._batch_priority if batch else None,
        )
        self._telemetry.routed(record, model.card.id, body)
        record.stream = payload.get("stream") is True
        affinity = None if adapter is not None else affinity_of(model.card.routing, payload, headers)
        lane = self._lanes.lane(model.card.id)
        if batch:  # when the lane is quiet; again if an interactive request preempts it
            return await lane.run_batch(
                lambda _: dispatch(model, name, route, body, record, affinity, adapter, batch=True),
                model.card.id,
            )
        record.hold = lane.hold(model.card.id)  # released at its first token or its end (batches.yield_until)
        record.release_hold_at_first_chunk = self._hold_to_first_token
        return await dispatch(model, name, route, body, record, affinity, adapter)

    async def _resolve(self, payload: dict[str, Any]) -> tuple[str, ServedModel, AdapterSpec | None]:
        """The name the body asks for, its model and adapter (ApiError 400/404)."""
        return await self._fresh(lambda: self._catalog.of_payload(payload))

    async def _fresh(self, lookup: Callable[[], T]) -> T:
        """`lookup()`, once more after reading the book of runtime adapters if it finds no such
        model: the name may be an adapter another ingress replica has just added."""
        view = self._admin.view
        if view is not None:
            view.touch()
        try:
            return lookup()
        except ApiError as error:
            if error.status != 404 or view is None:
                raise
        await view.refresh_for_miss()
        return lookup()

    async def _admin_call(
        self, request: Request, action: Callable[[dict[str, Any]], Awaitable[str]]
    ) -> Response:
        """One admin route: its key, its bounded body, the action; vLLM's plain-text answer."""
        record = self._telemetry.begin(_request_id(request), "admin")

        async def answer() -> Response:
            try:
                check_request_id(request)
                self._admin.authorize(request.headers.get("authorization"))
                _, payload = await read_payload(request, self._limits)
                message = await action(payload)
            except ApiError as error:
                return error_response(error)
            return Response(message, media_type="text/plain")

        return await self._measured(record, answer())

    async def _batch_call(
        self,
        request: Request,
        route: str,
        action: Callable[[str], Awaitable[Any]],
        *,
        has_body: bool = False,
        upload: bool = False,
    ) -> Response:
        """One call of the Batch API: its key (whose own objects it may see), then `action(key)`;
        a JSON answer, or a file's bytes."""
        record = self._telemetry.begin(_request_id(request), route)

        async def answer() -> Response:
            try:
                check_request_id(request)
                self._batches.check_enabled()
                record.identity = self._gate.identify(request)
                self._gate.check_origin(request, has_body=has_body, upload=upload)
                result = await action(record.identity)
            except ApiError as error:
                return error_response(error)
            if isinstance(result, bytes):
                return Response(result, media_type="application/octet-stream")
            return Response(json.dumps(result), media_type=_JSON)

        return await self._measured(record, answer())

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
        if not isinstance(response, RelayedStream):
            record.status, record.done = response.status_code, True
            self._finish(record)
        return response

    def _finish(self, record: RequestRecord) -> None:
        """A request ended (answered, failed or cancelled): free its quota and its lane, and
        record it."""
        if record.hold is not None:
            record.hold.release()
        if record.admission is not None:
            self._gate.release(record.admission, record.tokens_used)
        self._telemetry.finish(record)

    async def _list_models(self, request: Request) -> Response:
        try:
            check_request_id(request)
            self._gate.identify(request)
            self._gate.check_origin(request, has_body=False)
        except ApiError as error:
            return error_response(error)
        if self._admin.view is not None:
            await self._admin.view.refresh_for_miss()  # adapters added at run time: as of now
        data = [await self._card(name) for name in list(self._catalog.names())]
        return Response(json.dumps({"object": "list", "data": data}), media_type=_JSON)

    async def _get_model(self, model_id: str, request: Request, record: RequestRecord) -> Response:
        try:
            check_request_id(request)
            self._gate.identify(request)
            self._gate.check_origin(request, has_body=False)
            model = await self._fresh(lambda: self._catalog.get(model_id))
        except ApiError as error:
            return error_response(error)
        record.model = model.card.id
        return Response(json.dumps(await self._card(model_id)), media_type=_JSON)

    async def _card(self, name: str) -> dict[str, Any]:
        await self._catalog.get(name).learn_max_model_len()
        return self._catalog.card(name, self._created)


# What a client's X-Request-Id may hold: it becomes the engine's request id and the id of every
# response chunk, and it is written to the access log.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(request: Request) -> str:
    """The request's id: the client's X-Request-Id where it is a plain one, else a new one.

    Ray Serve's proxy keeps a client's X-Request-Id (or makes one), passes it in the request
    headers and returns it on the response; it becomes the engine's request id.
    """
    given = request.headers.get(REQUEST_ID_HEADER)
    return given if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def check_request_id(request: Request) -> None:
    """ApiError 400 for an X-Request-Id that is not 1 to 128 letters, digits or `._:-`."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and not _REQUEST_ID.fullmatch(given):
        raise ApiError(
            400,
            "X-Request-Id must be 1 to 128 characters: letters, digits, '.', '_', ':' or '-'.",
            param=REQUEST_ID_HEADER,
        )


def _serve_http_host() -> str | None:
    """The host Serve's HTTP proxies listen on, asked from the Serve controller.

    Ray Serve has no public API for it; this reads the controller's HTTP options and gives
    None (no check) if that ever changes, or when the ingress runs outside Ray (tests).
    """
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return str(ray.get(controller.get_http_config.remote(), timeout=10).host)
    except Exception as exc:
        logger.warning("cannot read Serve's HTTP host (%r): exposure check skipped", exc)
        return None


# --- the FastAPI app --------------------------------------------------------------------

ROUTES: list[tuple[str, str, str]] = [
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/completions", "completions"),
    ("POST", "/tokenize", "tokenize"),
    ("POST", "/detokenize", "detokenize"),
    ("GET", "/v1/models", "list_models"),
    ("GET", "/v1/models/{model_id:path}", "get_model"),
    ("GET", "/health", "health"),
    ("POST", "/v1/load_lora_adapter", "load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter", "unload_lora_adapter"),
    ("POST", "/v1/files", "files_create"),
    ("GET", "/v1/files", "files_list"),
    ("GET", "/v1/files/{file_id}", "file_get"),
    ("DELETE", "/v1/files/{file_id}", "file_delete"),
    ("GET", "/v1/files/{file_id}/content", "file_content"),
    ("POST", "/v1/batches", "batches_create"),
    ("GET", "/v1/batches", "batches_list"),
    ("GET", "/v1/batches/{batch_id}", "batch_get"),
    ("POST", "/v1/batches/{batch_id}/cancel", "batch_cancel"),
]


def _openai_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(ApiError(400, str(exc.errors()[:3])))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in the ingress")
        return Response(error_body(500, "Internal server error."), status_code=500, media_type=_JSON)


def openai_app(
    handler: Callable[[str], Callable[..., Any]], cors_allow_origins: tuple[str, ...] = ()
) -> FastAPI:
    """The FastAPI app of the OpenAI routes; `handler(name)` gives the endpoint of each.

    Under Serve the endpoints are `OpenAIIngress`'s functions (Serve binds each replica's
    instance); in-process tests pass one instance's bound methods. Both get the same app.
    """
    # No redirect from `/v1/models/` to `/v1/models`: an unknown path is an OpenAI 404.
    app = FastAPI(
        title="mistral-serve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    _openai_error_handlers(app)
    if cors_allow_origins:
        # Closed unless configured; never credentials, only what the API needs.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_allow_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Session-Id"],
            allow_credentials=False,
        )
    for method, path, name in ROUTES:
        app.api_route(path, methods=[method])(handler(name))
    return app


def make_ingress(cls: type[OpenAIIngress] = OpenAIIngress, cors_allow_origins: tuple[str, ...] = ()) -> type:
    """Attach the OpenAI routes to `cls` and wrap it as a Serve ingress class."""
    app = openai_app(lambda name: getattr(cls, name), cors_allow_origins)
    return serve.ingress(app)(cls)
