"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

The error types follow vLLM's OpenAI server, so clients see the same shape and the same
`type` from us as from `vllm serve`; the HTTP status always equals `error.code`.
"""

from __future__ import annotations

import json
from http import HTTPStatus

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_type(status: int) -> str:
    return _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"


def error_body(status: int, message: str, *, param: str | None = None, err_type: str | None = None) -> bytes:
    """The JSON body of an OpenAI error response."""
    error = {
        "message": message,
        "type": err_type or error_type(status),
        "param": param,
        "code": status,
    }
    return json.dumps({"error": error}).encode()
