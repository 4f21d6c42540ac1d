"""vLLM's OpenAI serving layer as the engine uses it: the serving object and request model of
each route, and its answers turned into the engine contract's items."""

from __future__ import annotations

import functools
import json
from argparse import Namespace
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from serve_app.engine.protocol import Head, Route, Usage
from serve_app.engine.vllm.compat import (
    CHAT_PROTOCOL_MODULES,
    COMPLETION_PROTOCOL_MODULES,
    TOKENIZE_PROTOCOL_MODULES,
    VALIDATION_HANDLER_MODULES,
    import_first,
)

# route -> (serving object, validator of the parsed JSON body, the serving method that answers)
Routes = dict[Route, tuple[Any, Callable[[Any], Any], Any]]


def _parser(annotation: Any) -> Callable[[Any], Any]:
    """A validator of a parsed JSON body for a request model or a union of them (e.g.
    TokenizeRequest)."""
    # Like FastAPI in vLLM's server: JSON first, then the model in Python mode (the error
    # messages differ between the two modes).
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_validate
    return TypeAdapter(annotation).validate_python


# Where each release keeps each route's request model (compat), and its name.
_REQUEST_MODELS = {
    Route.CHAT: (CHAT_PROTOCOL_MODULES, "ChatCompletionRequest"),
    Route.COMPLETION: (COMPLETION_PROTOCOL_MODULES, "CompletionRequest"),
    Route.TOKENIZE: (TOKENIZE_PROTOCOL_MODULES, "TokenizeRequest"),
    Route.DETOKENIZE: (TOKENIZE_PROTOCOL_MODULES, "DetokenizeRequest"),
}


@functools.cache
def request_parser(route: Route) -> Callable[[Any], Any]:
    """vLLM's request model of `route`, as a validator of a decoded JSON body."""
    modules, name = _REQUEST_MODELS[route]
    return _parser(import_first(modules, name))


def routes(state: Any) -> Routes:
    """vLLM's serving objects that `init_app_state` built, with the request model of each route."""
    found: Routes = {}
    if (chat := state.openai_serving_chat) is not None:
        found[Route.CHAT] = (chat, request_parser(Route.CHAT), chat.create_chat_completion)
    if (completion := state.openai_serving_completion) is not None:
        found[Route.COMPLETION] = (completion, request_parser(Route.COMPLETION), completion.create_completion)
    if (tokenization := getattr(state, "serving_tokenization", None)) is not None:
        for route, create in (
            (Route.TOKENIZE, tokenization.create_tokenize),
            (Route.DETOKENIZE, tokenization.create_detokenize),
        ):
            found[route] = (tokenization, request_parser(route), create)
    return found


async def validation_error(exc: ValidationError, ns: Namespace) -> Head:
    """The 400 that `vllm serve` gives for a body its request model rejects.

    vLLM's server lets FastAPI validate the body and turns the RequestValidationError into an
    OpenAI error with its own handler; we call that same handler, so the status, type, param
    and message are vLLM's, in each vLLM release.
    """
    from fastapi.exceptions import RequestValidationError

    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    handler = import_first(VALIDATION_HANDLER_MODULES, "validation_exception_handler")
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=ns)), state=SimpleNamespace())
    response = await handler(request, RequestValidationError(errors))
    return Head(int(response.status_code), bytes(response.body))


def whole_response(result: BaseModel) -> Head:
    """A whole response: vLLM's ErrorResponse (status = error.code) or a 200 body."""
    error = getattr(result, "error", None)
    status = int(error.code) if error is not None and hasattr(error, "code") else 200
    usage = getattr(result, "usage", None)
    counted = Usage(int(usage.prompt_tokens), int(usage.completion_tokens or 0)) if usage else None
    return Head(status, result.model_dump_json().encode(), usage=counted)


def count_usage(payload: Any) -> bool:
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


def usage_of(chunk: str) -> Usage | None:
    """The usage of a stream's final usage chunk (`choices: []` and `usage`), else None."""
    if '"usage":' not in chunk or '"choices":[]' not in chunk:
        return None
    try:
        usage = json.loads(chunk[len("data: ") :])["usage"]
        return Usage(int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))
    except (ValueError, KeyError, TypeError):
        return None
